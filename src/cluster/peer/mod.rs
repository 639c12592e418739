//! The ClawRoam peer link: authenticated node-to-node links that carry hand-overs (and relay).
//!
//! * [`wire`]: the messages and their framing (pure codec).
//! * [`auth`]: mutual TLS 1.3 keyed by the cluster secret (a pinned, derived Ed25519 key).
//! * [`Peers`] (threads in `link`): one link per pair of nodes, carrying both directions and
//!   shared by every session.
//!
//! ## Links
//!
//! A link is one TCP socket with TLS, driven by one thread that polls the socket and an eventfd
//! for its outgoing queue. After TLS, the side that connected sends HELLO and waits for the
//! other's; the accepting side answers HELLO only once it has decided to keep the link, and the
//! connecting side sends nothing else before that answer. Nothing but HELLO may come first,
//! and only version 1 is spoken.
//!
//! Each peer node has one outgoing queue (bounded, [`QUEUE_CAP`] messages), which outlives the
//! sockets: whichever link to that node is *active* drains it. When both nodes connect at once,
//! the link opened by the node whose id sorts lower is kept (between two links opened by the
//! same node, the newer). The other is *retired*: it takes nothing more from the queue, sends
//! TLS close_notify after what it already wrote, and keeps reading (and delivering) until the
//! peer's close_notify, so nothing is lost in the switch. Messages can only be reordered across
//! that switch (sent on the retired link, overtaken on the kept one); the hand-over protocol
//! waits for answers, so it does not depend on that order.
//!
//! A link that fails (connect, handshake, EOF, a bad frame, 20 s without traffic) marks its node
//! dead and drops the queue; the next [`Peers::send`] connects again, at most every
//! [`RETRY_EVERY`] per node. Keep-alive pings go out after 5 s idle and are answered by the
//! link itself. When a node dials us although our (preferred) link to it is up, that link is
//! pinged at once: if the node restarted, the stale link fails on the reset and the node's next
//! try gets through (a node that vanished without a reset takes up to the 20 s).
//!
//! Incoming connections must finish TLS and HELLO within [`HELLO_TIMEOUT`]; at most
//! [`MAX_HANDSHAKING`] may be at it at once. Anything that fails there (garbage, plaintext, another
//! cluster's secret, our own node id) is closed and logged at warn with its address.

pub mod auth;
mod link;
pub mod wire;

pub use auth::PeerAuth;
pub use wire::{PeerMsg, WireError};

use crossbeam_channel::{Receiver, Sender};
use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Called on a link's thread for every message from peer node `.0` (never HELLO, Ping, or the
/// link's own keep-alive Pong). It must not block: the link reads nothing while it runs.
pub type OnMsg = Arc<dyn Fn(&str, PeerMsg) + Send + Sync>;

/// Messages a node's outgoing queue holds before [`Peers::send`] says no.
pub const QUEUE_CAP: usize = 65_536;
/// How long a TCP connect may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// The least time between two connection attempts to one node.
pub const RETRY_EVERY: Duration = Duration::from_millis(500);
/// TLS handshake plus HELLO must be done within this, or the socket is closed.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// Incoming connections that may be in their handshake at once; more are closed at accept.
pub const MAX_HANDSHAKING: usize = 256;

/// Why the peer link cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error(
        "the cluster secret is {0} bytes; it must be at least {min} — write at least {min} \
         random bytes to the secret file (e.g. `head -c 32 /dev/urandom > cluster.secret`) \
         and give every node the same file",
        min = auth::MIN_SECRET
    )]
    SecretTooShort(usize),
    #[error("peer TLS setup: {0}")]
    Tls(String),
}

/// The peer links of this node. Cheap to clone; [`Peers::shutdown`] stops them (dropping the
/// handles does not: the link threads hold the state).
#[derive(Clone)]
pub struct Peers {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Peers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peers")
            .field("node", &self.inner.node)
            .field("local", &self.inner.local)
            .finish_non_exhaustive()
    }
}

impl Peers {
    /// Listens on `listen` (the peer port) and serves links; `node` is this node's id.
    pub fn start(
        listen: SocketAddr,
        node: String,
        auth: PeerAuth,
        on_msg: OnMsg,
    ) -> std::io::Result<Peers> {
        if node.is_empty() || node.len() > wire::MAX_STR {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "peer link: node id must be 1 to {} bytes, not {}",
                    wire::MAX_STR,
                    node.len()
                ),
            ));
        }
        let listener = TcpListener::bind(listen)?;
        listener.set_nonblocking(true)?;
        let local = listener.local_addr()?;
        let wake = Arc::new(Ctl::new()?);
        let inner = Arc::new(Inner {
            node,
            auth,
            on_msg,
            local,
            slots: Mutex::new(HashMap::new()),
            stop: AtomicBool::new(false),
            listener_wake: wake.clone(),
            listener_thread: Mutex::new(None),
            handshaking: AtomicUsize::new(0),
            live: AtomicUsize::new(0),
            next_id: AtomicU64::new(1),
        });
        let i2 = inner.clone();
        let h = std::thread::Builder::new()
            .name("peer-listen".into())
            .spawn(move || link::listen(i2, listener, wake))?;
        *lock(&inner.listener_thread) = Some(h);
        Ok(Peers { inner })
    }

    /// This node's id.
    pub fn node(&self) -> &str {
        &self.inner.node
    }

    /// The address the peer port is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.inner.local
    }

    /// Queues `msg` for node `to`, connecting to `addr` if there is no link yet. Never blocks
    /// on the network (the caller is a shard thread): false only when the node's bounded queue
    /// is full, the node is known dead (its last connection attempt failed less than
    /// [`RETRY_EVERY`] ago), `to` is this node, the message cannot be encoded, or the links
    /// are shut down. Delivery is not guaranteed (the protocol above has timeouts).
    pub fn send(&self, to: &str, addr: SocketAddr, msg: PeerMsg) -> bool {
        let inner = &self.inner;
        if inner.stopping() || to == inner.node || to.is_empty() || to.len() > wire::MAX_STR {
            return false;
        }
        if let Err(e) = msg.encoded_len() {
            tracing::debug!("peer link: not sending to {to}: {e}");
            return false;
        }
        let queued = {
            let mut slots = lock(&inner.slots);
            if !slots.contains_key(to) {
                slots.insert(to.to_string(), Slot::new());
            }
            let Some(slot) = slots.get_mut(to) else {
                return false;
            };
            if let Some(a) = &slot.active {
                if !slot.queue.push(msg) {
                    return false;
                }
                a.ctl.notify();
                return true;
            }
            if slot.connecting {
                return slot.queue.push(msg);
            }
            if slot.dead && slot.last_attempt.is_some_and(|t| t.elapsed() < RETRY_EVERY) {
                return false;
            }
            slot.dead = false;
            slot.connecting = true;
            slot.last_attempt = Some(Instant::now());
            slot.queue.push(msg)
        };
        // An attempt is started (`connecting` is set): a thread must own it.
        if !link::spawn_outgoing(inner.clone(), to.to_string(), addr) {
            inner.outgoing_done(to, false);
            return false;
        }
        queued
    }

    /// Every node this node has a link (or a queue) for, and whether a link is up.
    pub fn links(&self) -> Vec<(String, bool)> {
        let slots = lock(&self.inner.slots);
        let mut v: Vec<(String, bool)> = slots
            .iter()
            .map(|(k, s)| (k.clone(), s.active.is_some()))
            .collect();
        v.sort();
        v
    }

    /// Stops listening and closes every link (close_notify sent, best effort). Waits up to
    /// 3 s for the link threads, except when called from one (from `on_msg`).
    pub fn shutdown(&self) {
        let inner = &self.inner;
        if inner.stop.swap(true, Ordering::SeqCst) {
            return;
        }
        inner.listener_wake.kick();
        {
            let slots = lock(&inner.slots);
            for s in slots.values() {
                if let Some(a) = &s.active {
                    a.ctl.kick();
                }
                s.queue.clear();
            }
        }
        if link::on_link_thread() {
            return;
        }
        if let Some(h) = lock(&inner.listener_thread).take() {
            let _ = h.join();
        }
        let until = Instant::now() + Duration::from_secs(3);
        while inner.live.load(Ordering::SeqCst) > 0 && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Link threads alive (handshaking, active or retiring), for tests.
    #[cfg(test)]
    fn live_threads(&self) -> usize {
        self.inner.live.load(Ordering::SeqCst)
    }
}

/// State shared by the handle, the listener and the link threads.
struct Inner {
    node: String,
    auth: PeerAuth,
    on_msg: OnMsg,
    local: SocketAddr,
    slots: Mutex<HashMap<String, Slot>>,
    stop: AtomicBool,
    listener_wake: Arc<Ctl>,
    listener_thread: Mutex<Option<JoinHandle<()>>>,
    /// Incoming connections before their HELLO.
    handshaking: AtomicUsize,
    /// Threads of connections (any phase).
    live: AtomicUsize,
    next_id: AtomicU64,
}

/// What this node knows of one peer node.
struct Slot {
    queue: Arc<Queue>,
    active: Option<Active>,
    /// An outgoing connection attempt is under way.
    connecting: bool,
    /// The last link failed (or the attempt did) and no other is up.
    dead: bool,
    last_attempt: Option<Instant>,
}

impl Slot {
    fn new() -> Slot {
        Slot {
            queue: Arc::new(Queue::new()),
            active: None,
            connecting: false,
            dead: false,
            last_attempt: None,
        }
    }
}

/// The link that drains a node's queue.
struct Active {
    id: u64,
    /// The node that opened it.
    opener: String,
    ctl: Arc<Ctl>,
}

/// Whether a new link opened by `new` replaces the active one opened by `old`.
fn replaces(new: &str, old: &str) -> bool {
    new <= old
}

impl Inner {
    fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// A link to `peer` opened by `opener` finished its HELLO: whether it is kept (then it gets
    /// the queue to drain) — the one it replaces, if any, is told to retire.
    fn register(&self, peer: &str, id: u64, opener: &str, ctl: &Arc<Ctl>) -> Option<Arc<Queue>> {
        if self.stopping() {
            return None;
        }
        let mut slots = lock(&self.slots);
        let slot = slots.entry(peer.to_string()).or_insert_with(Slot::new);
        if let Some(old) = &slot.active {
            if !replaces(opener, &old.opener) {
                // The peer dials although our link to it is up: if that link is stale (the
                // node restarted), a ping now makes it fail fast, and the peer's next try
                // gets through.
                old.ctl.probe.store(true, Ordering::SeqCst);
                old.ctl.kick();
                return None;
            }
            old.ctl.retire.store(true, Ordering::SeqCst);
            old.ctl.kick();
            tracing::debug!(
                "peer link to {peer}: link {} (opened by {}) replaces link {} (opened by {})",
                id,
                opener,
                old.id,
                old.opener
            );
        }
        slot.active = Some(Active {
            id,
            opener: opener.to_string(),
            ctl: ctl.clone(),
        });
        slot.dead = false;
        Some(slot.queue.clone())
    }

    /// An outgoing attempt to `peer` is over (`ok`: it reached HELLO). Returns whether a link
    /// to `peer` is up. A failed attempt with no link up marks the node dead and drops its
    /// queue.
    fn outgoing_done(&self, peer: &str, ok: bool) -> bool {
        let mut slots = lock(&self.slots);
        let Some(slot) = slots.get_mut(peer) else {
            return false;
        };
        slot.connecting = false;
        if !ok && slot.active.is_none() {
            slot.dead = true;
            slot.queue.clear();
        }
        slot.active.is_some()
    }

    /// Link `id` to `peer` ended; if it was the active one, the node is dead (and its queue
    /// dropped) unless an outgoing attempt is under way.
    fn deactivate(&self, peer: &str, id: u64) {
        let mut slots = lock(&self.slots);
        let Some(slot) = slots.get_mut(peer) else {
            return;
        };
        if slot.active.as_ref().is_some_and(|a| a.id == id) {
            slot.active = None;
            if !slot.connecting {
                slot.dead = true;
                slot.queue.clear();
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A node's outgoing queue: unbounded channel (memory grows only with use) with a count bound.
struct Queue {
    tx: Sender<PeerMsg>,
    rx: Receiver<PeerMsg>,
    len: AtomicUsize,
}

impl Queue {
    fn new() -> Queue {
        let (tx, rx) = crossbeam_channel::unbounded();
        Queue {
            tx,
            rx,
            len: AtomicUsize::new(0),
        }
    }

    fn push(&self, m: PeerMsg) -> bool {
        if self.len.fetch_add(1, Ordering::SeqCst) >= QUEUE_CAP {
            self.len.fetch_sub(1, Ordering::SeqCst);
            return false;
        }
        // Cannot fail: the queue holds its own receiver.
        self.tx.send(m).is_ok()
    }

    fn pop(&self) -> Option<PeerMsg> {
        let m = self.rx.try_recv().ok()?;
        self.len.fetch_sub(1, Ordering::SeqCst);
        Some(m)
    }

    fn is_empty(&self) -> bool {
        self.rx.is_empty()
    }

    fn clear(&self) {
        while self.pop().is_some() {}
    }
}

/// Wakes a link (or the listener) thread: an eventfd plus flags.
struct Ctl {
    fd: OwnedFd,
    /// The thread is about to sleep (or sleeps) in poll and wants a kick for new messages.
    armed: AtomicBool,
    /// The link is replaced: stop taking from the queue and close gracefully.
    retire: AtomicBool,
    /// Send a Ping now (a stale link to a restarted node then fails fast).
    probe: AtomicBool,
}

impl Ctl {
    fn new() -> std::io::Result<Ctl> {
        use rustix::event::{eventfd, EventfdFlags};
        let fd = eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)?;
        Ok(Ctl {
            fd,
            armed: AtomicBool::new(false),
            retire: AtomicBool::new(false),
            probe: AtomicBool::new(false),
        })
    }

    /// New messages: wakes the thread only if it sleeps (one syscall per sleep, not per send).
    fn notify(&self) {
        if self.armed.swap(false, Ordering::SeqCst) {
            self.kick();
        }
    }

    fn kick(&self) {
        let _ = rustix::io::write(&self.fd, &1u64.to_ne_bytes());
    }

    fn clear(&self) {
        let mut b = [0u8; 8];
        let _ = rustix::io::read(&self.fd, &mut b);
    }

    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

#[cfg(test)]
mod tests;
