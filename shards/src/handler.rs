//! The application's side of a shard: the [`Handler`] callbacks, the [`Ctx`] they act
//! through, and the [`ConnId`] naming a connection.

use crate::reactor::{Core, Envelope};
use crate::Backend;
use crate::{sys, udp};
use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Instant;

/// Identifies a connection on its shard: slab index + generation, so stale ids are detected
/// and ignored.
#[derive(Copy, Clone, PartialEq, Eq, Hash, Debug)]
pub struct ConnId {
    pub(crate) idx: u32,
    pub(crate) gen: u32,
}

impl ConnId {
    /// An id that never names a connection (operations on it are ignored like on any stale
    /// id): a placeholder where a connection is expected but none exists yet.
    pub const NONE: ConnId = ConnId {
        idx: u32::MAX,
        gen: u32::MAX,
    };

    /// Slab index (unique among the live conns of one shard).
    pub fn index(&self) -> u32 {
        self.idx
    }
    /// Slot generation.
    pub fn generation(&self) -> u32 {
        self.gen
    }
}

/// Application callbacks of one shard. Constructed on its shard thread; need not be `Send`.
pub trait Handler: 'static {
    /// Cross-shard message type.
    type Msg: Send + 'static;

    fn on_start(&mut self, _ctx: &mut impl Context<Self::Msg>) {}
    fn on_accept(&mut self, ctx: &mut impl Context<Self::Msg>, conn: ConnId, peer: SocketAddr);
    /// A connection accepted on listener `listener` (0: [`Config::listen`](crate::Config::listen),
    /// `i + 1`: [`Config::extra_listen`](crate::Config::extra_listen)`[i]`). By default, the
    /// same as [`Handler::on_accept`]: a handler with one listener need not know.
    fn on_accept_at(
        &mut self,
        ctx: &mut impl Context<Self::Msg>,
        conn: ConnId,
        peer: SocketAddr,
        listener: usize,
    ) {
        let _ = listener;
        self.on_accept(ctx, conn, peer);
    }
    /// Bytes are borrowed from the provided buffer, which is recycled when this returns.
    fn on_data(&mut self, ctx: &mut impl Context<Self::Msg>, conn: ConnId, data: &[u8]);
    /// Peer EOF (`None`) or error; the conn is gone after this. Not called for conns the
    /// handler closed/aborted itself or handed off.
    fn on_closed(
        &mut self,
        ctx: &mut impl Context<Self::Msg>,
        conn: ConnId,
        err: Option<io::Error>,
    );
    /// A conn that went above the high watermark drained below the low watermark.
    fn on_writable(&mut self, _ctx: &mut impl Context<Self::Msg>, _conn: ConnId) {}
    /// Outcome of `ctx.connect_unix`; on `Err` the conn is already gone.
    fn on_connected(
        &mut self,
        _ctx: &mut impl Context<Self::Msg>,
        _conn: ConnId,
        _res: io::Result<()>,
    ) {
    }
    /// A message from `ctx.send_to_shard` / `Remote::send`.
    fn on_message(&mut self, ctx: &mut impl Context<Self::Msg>, msg: Self::Msg);
    /// A live conn handed over from another shard. `unread` = bytes the old shard received
    /// after the hand-off request (feed them to the parser first).
    fn on_adopt(
        &mut self,
        ctx: &mut impl Context<Self::Msg>,
        conn: ConnId,
        peer: SocketAddr,
        unread: Vec<u8>,
        msg: Self::Msg,
    );
    /// A conn this shard exported (`ctx.export`) is out of the runtime: its socket, the bytes
    /// received but not yet delivered (`unread`) and the output not yet sent (`out`). `conn` is
    /// the id it had (dead now). Dropping `fd` closes the socket.
    fn on_exported(
        &mut self,
        _ctx: &mut impl Context<Self::Msg>,
        _conn: ConnId,
        _fd: std::os::fd::OwnedFd,
        _unread: Vec<u8>,
        _out: Vec<u8>,
        _msg: Self::Msg,
    ) {
    }
    /// After `ctx.stop_accepting`: the shard has let go of its listening sockets and no
    /// `on_accept` follows any more (connections the kernel had already accepted for this
    /// shard were delivered before this). Called once.
    fn on_accept_stopped(&mut self, _ctx: &mut impl Context<Self::Msg>) {}
    /// The deadline set with `ctx.wake_at` passed.
    fn on_tick(&mut self, _ctx: &mut impl Context<Self::Msg>, _now: Instant) {}
    /// A datagram arrived on this shard's UDP socket ([`Config::udp`](crate::Config::udp)). The bytes are
    /// borrowed from a per-shard buffer that is reused when this returns.
    fn on_datagram(&mut self, _ctx: &mut impl Context<Self::Msg>, _from: SocketAddr, _data: &[u8]) {
    }
    /// The end of one turn of the event loop: every event of the turn (completions, mailbox,
    /// timers) has had its callback, and the shard is about to wait for more. Work that
    /// batches across callbacks goes out here (e.g. a QUIC endpoint's datagrams), once.
    fn on_turn_end(&mut self, _ctx: &mut impl Context<Self::Msg>) {}
    /// Stop requested. Afterwards the runtime stops accepting, flushes queued output
    /// (bounded ~2 s), closes everything and ends the thread.
    fn on_shutdown(&mut self, _ctx: &mut impl Context<Self::Msg>) {}
}

/// The handler's view of its shard during a callback.
pub struct Ctx<'a, M> {
    core: &'a mut Core<M>,
}

impl<'a, M> Ctx<'a, M> {
    pub(crate) fn new(core: &'a mut Core<M>) -> Self {
        Ctx { core }
    }
}

/// What a handler can do to its shard during a callback. The runtime passes its [`Ctx`]; tests
/// pass a [`sim::SimCtx`](crate::sim::SimCtx), which records every action, so a handler is tested
/// without sockets (the way quinn-proto's tests drive a connection pair).
pub trait Context<M> {
    /// This shard's index.
    fn shard(&self) -> usize;
    /// Number of shards.
    fn shards(&self) -> usize;
    /// Time at the start of the current event batch.
    fn now(&self) -> Instant;
    /// The I/O backend the runtime runs on.
    fn backend(&self) -> Backend;
    /// Copy `bytes` into the conn's ordered output queue; returns the bytes now queued.
    /// Ignored (returns 0) for unknown/closed conns.
    fn send(&mut self, conn: ConnId, bytes: &[u8]) -> usize;
    /// Output of `conn` the peer has not received yet: bytes still queued here plus bytes the
    /// kernel has not sent or the peer's TCP has not acknowledged. `Some(0)` means everything
    /// sent has reached the peer's socket. `None` for unknown/closed conns.
    fn unsent(&self, conn: ConnId) -> Option<usize>;
    /// Whether `conn`'s output queue is above the high watermark (an `on_writable` follows
    /// once it drains below the low one).
    fn is_backpressured(&self, conn: ConnId) -> bool;
    /// Flush queued output, then close (bounded time). No `on_closed` for it.
    fn close(&mut self, conn: ConnId);
    /// Close now, dropping queued output. No `on_closed` for it.
    fn abort(&mut self, conn: ConnId);
    /// Pause/resume receiving on a conn. Paused conns hold no receive op.
    fn set_reading(&mut self, conn: ConnId, on: bool);
    /// Non-blocking AF_UNIX stream connect; `on_connected` reports the outcome.
    fn connect_unix(&mut self, path: &Path) -> io::Result<ConnId>;
    /// Post a message to a shard's mailbox (this shard included).
    fn send_to_shard(&mut self, shard: usize, msg: M);
    /// Move a live conn to another shard (delivered to its `on_adopt`). The id is dead here
    /// afterwards.
    fn hand_off(&mut self, conn: ConnId, shard: usize, msg: M);
    /// Take a live conn out of the runtime without closing it (a live upgrade moves it to
    /// another process): once no op is in flight on it, `on_exported` gets its socket with
    /// the bytes received but not delivered and the output not yet sent. The id is dead here
    /// afterwards. `false` (and no `on_exported`): the conn is gone already (closed, failed —
    /// its `on_closed` may still be on its way) or unknown.
    fn export(&mut self, conn: ConnId, msg: M) -> bool;
    /// Take a connected socket in (e.g. one another process exported): `out` is sent first;
    /// reading starts at once.
    fn adopt_fd(&mut self, fd: std::os::fd::OwnedFd, out: &[u8]) -> ConnId;
    /// Stop accepting connections and reading datagrams on this shard (a live upgrade gave
    /// the listening sockets to another process; what the kernel queued stays queued for it).
    fn stop_accepting(&mut self);
    /// Start accepting on a runtime started paused ([`Inherited::paused`](crate::Inherited)):
    /// until then the shard takes neither connections nor datagrams (the kernel queues them).
    fn start_accepting(&mut self);
    /// Request an `on_tick` at `deadline` (the earliest requested deadline wins).
    fn wake_at(&mut self, deadline: Instant);
    /// Ask the whole runtime to stop.
    fn stop(&mut self);
    /// The peer's address of a TCP conn (`None` for Unix conns and unknown ids).
    fn peer_addr(&self, conn: ConnId) -> Option<SocketAddr>;
    /// Connection slots in use on this shard (including conns still flushing/closing).
    fn conn_count(&self) -> usize;
    /// Sends one datagram from this shard's UDP socket without blocking. A full socket
    /// buffer drops it (`Err(WouldBlock)`, also counted in [`Context::udp_dropped`]); without a
    /// UDP socket this is `Err(NotConnected)`.
    fn send_datagram(&mut self, to: SocketAddr, data: &[u8]) -> io::Result<()>;
    /// Datagrams this shard dropped: truncated on receive, or not sent (buffer full, error).
    fn udp_dropped(&self) -> u64;
    /// The UDP socket's bound address (port 0 resolved), if there is one.
    fn udp_local_addr(&self) -> Option<SocketAddr>;
}

impl<M: Send + 'static> Context<M> for Ctx<'_, M> {
    fn shard(&self) -> usize {
        self.core.shard
    }
    fn shards(&self) -> usize {
        self.core.shards
    }
    fn now(&self) -> Instant {
        self.core.now
    }
    fn backend(&self) -> Backend {
        self.core.backend
    }
    fn send(&mut self, conn: ConnId, bytes: &[u8]) -> usize {
        self.core.send(conn, bytes)
    }
    fn unsent(&self, conn: ConnId) -> Option<usize> {
        self.core.unsent(conn)
    }
    fn is_backpressured(&self, conn: ConnId) -> bool {
        self.core.is_backpressured(conn)
    }
    fn close(&mut self, conn: ConnId) {
        self.core.close(conn)
    }
    fn abort(&mut self, conn: ConnId) {
        self.core.abort(conn)
    }
    fn set_reading(&mut self, conn: ConnId, on: bool) {
        self.core.set_reading(conn, on)
    }
    fn connect_unix(&mut self, path: &Path) -> io::Result<ConnId> {
        self.core.connect_unix(path)
    }
    fn send_to_shard(&mut self, shard: usize, msg: M) {
        if !self.core.shared.send(shard, Envelope::Msg(msg)) {
            tracing::debug!(shard, "send_to_shard: target shard is gone or out of range");
        }
    }
    fn hand_off(&mut self, conn: ConnId, shard: usize, msg: M) {
        self.core.hand_off(conn, shard, msg)
    }
    fn export(&mut self, conn: ConnId, msg: M) -> bool {
        self.core.export(conn, msg)
    }
    fn adopt_fd(&mut self, fd: std::os::fd::OwnedFd, out: &[u8]) -> ConnId {
        self.core.adopt_fd(fd, out)
    }
    fn stop_accepting(&mut self) {
        self.core.accept_stopped = true;
    }
    fn start_accepting(&mut self) {
        self.core.accept_paused = false;
    }
    fn wake_at(&mut self, deadline: Instant) {
        self.core.wake_at = Some(match self.core.wake_at {
            Some(d) if d <= deadline => d,
            _ => deadline,
        });
    }
    fn stop(&mut self) {
        self.core.shared.request_stop();
    }
    fn peer_addr(&self, conn: ConnId) -> Option<SocketAddr> {
        self.core.peer_addr(conn)
    }
    fn conn_count(&self) -> usize {
        self.core.live
    }
    fn send_datagram(&mut self, to: SocketAddr, data: &[u8]) -> io::Result<()> {
        let Some(fd) = self.core.udp.as_ref() else {
            return Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "this runtime has no UDP socket",
            ));
        };
        let r = udp::send_to(std::os::fd::AsRawFd::as_raw_fd(fd), &to, data);
        if r.is_err() {
            self.core.udp_dropped += 1;
        }
        r
    }
    fn udp_dropped(&self) -> u64 {
        self.core.udp_dropped
    }
    fn udp_local_addr(&self) -> Option<SocketAddr> {
        self.core
            .udp
            .as_ref()
            .and_then(|fd| sys::local_addr(std::os::fd::AsRawFd::as_raw_fd(fd)).ok())
    }
}
