//! Backend-independent shard state: the connection slab, output queues, deferred handler
//! events, the mailbox and shutdown bookkeeping. `Ctx` operations only touch this state and
//! mark connections dirty; the backend then `drive`s dirty connections (submits sends, arms or
//! cancels receives, closes and frees slots).

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, IntoRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};

use crate::{sys, Backend, Config, ConnId, Ctx, Handler};

/// How long `close()` (and a peer EOF) may take to flush before the conn is aborted.
pub(crate) const CLOSE_FLUSH_TIMEOUT: Duration = Duration::from_secs(5);
/// How long shutdown may take to flush before everything is aborted.
pub(crate) const SHUTDOWN_FLUSH_TIMEOUT: Duration = Duration::from_secs(2);

/// Connection flag bits (`Conn::flags`).
pub(crate) mod f {
    /// Slot in use.
    pub const USED: u16 = 1 << 0;
    /// Invisible to the handler (closed, aborted, failed or handed off).
    pub const DEAD: u16 = 1 << 1;
    /// Handler wants receives.
    pub const READING: u16 = 1 << 2;
    /// uring: multishot recv in flight. epoll: EPOLLIN registered.
    pub const RECV: u16 = 1 << 3;
    /// uring: send in flight. epoll: EPOLLOUT registered.
    pub const SEND: u16 = 1 << 4;
    /// Above the high watermark; `on_writable` pending.
    pub const BP: u16 = 1 << 5;
    /// Close once the output queue is flushed.
    pub const CLOSING: u16 = 1 << 6;
    /// Close as soon as no op is in flight; output dropped.
    pub const ABORT: u16 = 1 << 7;
    /// Being handed to another shard.
    pub const HANDOFF: u16 = 1 << 8;
    /// uring: AsyncCancel for the recv submitted.
    pub const CANCEL_RECV: u16 = 1 << 9;
    /// uring: AsyncCancel for the send submitted.
    pub const CANCEL_SEND: u16 = 1 << 10;
    /// In `Core::dirty`.
    pub const DIRTY: u16 = 1 << 11;
    /// epoll: fd added to the epoll set.
    pub const REG: u16 = 1 << 12;
    /// Has bytes in `Core::stash` (received while paused).
    pub const STASH: u16 = 1 << 13;
    /// uring: peer EOF seen while paused/stashed; reported once the stash is delivered.
    /// Both backends: peer EOF seen on a lingering (closing) conn.
    pub const EOF: u16 = 1 << 14;
    /// Graceful close in progress: output flushed, write side shut down, input drained and
    /// discarded until the peer's EOF (closing with unread input would make the kernel send a
    /// RST, which can destroy output the peer has not read yet).
    pub const LINGER: u16 = 1 << 15;
}

/// A graceful close whose output is flushed: shut the write side down once, so the peer sees
/// EOF after the last byte; returns whether the conn is still lingering (waiting for EOF).
pub(crate) fn linger(c: &mut Conn) -> bool {
    let graceful = c.flags & (f::DEAD | f::CLOSING | f::ABORT | f::HANDOFF) == f::DEAD | f::CLOSING;
    if !graceful || c.out.is_some() {
        return false;
    }
    if c.flags & f::LINGER == 0 {
        c.flags |= f::LINGER;
        sys::shutdown_write(c.fd);
    }
    c.flags & f::EOF == 0
}

/// Per-connection state. 24 bytes on 64-bit targets (see the `conn_size` test); idle
/// connections own nothing else — no receive buffer, no output queue.
pub(crate) struct Conn {
    pub fd: RawFd,
    pub gen: u32,
    /// Allocated only while output is queued.
    pub out: Option<Box<OutQueue>>,
    pub flags: u16,
    /// uring: ops in flight that reference this slot (recv, send). The slot is never freed
    /// and the fd never closed while this is non-zero.
    pub ops: u16,
}

const CHUNK_MAX: usize = 64 * 1024;
/// Output queues kept for reuse per shard once emptied (see [`Core::recycle`]): a queue costs
/// three allocations (the box, its chunk index and a chunk), and a busy shard empties and
/// refills one per connection per round trip. At most `POOL_QUEUES × ~1.2 KiB` (about 5 MB)
/// stay allocated per shard after a burst; an io_uring shard with thousands of connections has
/// that many queues alive at once (each until its send completes).
const POOL_QUEUES: usize = 4096;
/// A pooled queue keeps one empty chunk of at most this capacity.
const POOL_CHUNK_MAX: usize = 1024;

/// Ordered output queue. The front chunk is never modified while a send referencing it is
/// in flight (`locked`), so the kernel may read it in place.
pub(crate) struct OutQueue {
    chunks: VecDeque<Vec<u8>>,
    off: usize,
    len: usize,
    /// An empty chunk to use before allocating one.
    spare: Vec<u8>,
}

impl OutQueue {
    fn new() -> Self {
        OutQueue {
            chunks: VecDeque::new(),
            off: 0,
            len: 0,
            spare: Vec::new(),
        }
    }

    /// Empties the queue for reuse, keeping its chunk index and one small chunk; `false` when
    /// it holds nothing worth keeping.
    fn reset(&mut self) -> bool {
        self.off = 0;
        self.len = 0;
        while let Some(mut c) = self.chunks.pop_front() {
            if c.capacity() <= POOL_CHUNK_MAX && c.capacity() > self.spare.capacity() {
                c.clear();
                self.spare = c;
            }
        }
        if self.spare.capacity() > POOL_CHUNK_MAX {
            self.spare = Vec::new();
        }
        self.chunks.capacity() <= 16
    }

    fn push(&mut self, data: &[u8], front_locked: bool) {
        self.len += data.len();
        let can_append = match self.chunks.back() {
            Some(b) => {
                (self.chunks.len() > 1 || !front_locked)
                    && (b.len() + data.len() <= CHUNK_MAX || b.is_empty())
            }
            None => false,
        };
        if can_append {
            self.chunks.back_mut().unwrap().extend_from_slice(data);
        } else {
            let mut v = if self.spare.capacity() >= data.len() {
                std::mem::take(&mut self.spare)
            } else {
                Vec::with_capacity(data.len().max(256))
            };
            v.extend_from_slice(data);
            self.chunks.push_back(v);
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    /// The unsent part of the front chunk (non-empty while `len() > 0`).
    pub fn front(&self) -> &[u8] {
        match self.chunks.front() {
            Some(c) => &c[self.off..],
            None => &[],
        }
    }

    fn consume(&mut self, mut n: usize) {
        n = n.min(self.len);
        self.len -= n;
        while n > 0 {
            let front_left = self.chunks[0].len() - self.off;
            if n >= front_left {
                n -= front_left;
                if let Some(mut c) = self.chunks.pop_front() {
                    if c.capacity() <= POOL_CHUNK_MAX && self.spare.capacity() == 0 {
                        c.clear();
                        self.spare = c;
                    }
                }
                self.off = 0;
            } else {
                self.off += n;
                n = 0;
            }
        }
    }

    fn into_vec(self) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.len);
        let mut off = self.off;
        for c in self.chunks {
            v.extend_from_slice(&c[off..]);
            off = 0;
        }
        v
    }
}

/// Cross-shard mailbox item.
pub(crate) enum Envelope<M> {
    Msg(M),
    Adopt {
        fd: OwnedFd,
        peer: SocketAddr,
        unread: Vec<u8>,
        out: Vec<u8>,
        msg: M,
    },
}

/// Per-shard wakeup: an eventfd plus a flag that coalesces wakeups.
pub(crate) struct Waker {
    fd: OwnedFd,
    pending: AtomicBool,
}

impl Waker {
    pub fn new(nonblocking: bool) -> io::Result<Waker> {
        Ok(Waker {
            fd: sys::eventfd(nonblocking)?,
            pending: AtomicBool::new(false),
        })
    }
}

/// State shared by all shards and remotes.
pub(crate) struct Shared<M> {
    pub senders: Vec<Sender<Envelope<M>>>,
    wakers: Vec<Waker>,
    pub stop: AtomicBool,
}

impl<M> Shared<M> {
    pub fn new(senders: Vec<Sender<Envelope<M>>>, wakers: Vec<Waker>) -> Self {
        Shared {
            senders,
            wakers,
            stop: AtomicBool::new(false),
        }
    }

    pub fn wake(&self, shard: usize) {
        let w = &self.wakers[shard];
        if !w.pending.swap(true, Ordering::SeqCst) {
            sys::eventfd_write(w.fd.as_raw_fd());
        }
    }

    /// Enqueue and wake. `false` (message dropped; any fd inside closed) if the shard does not
    /// exist or has ended.
    pub fn send(&self, shard: usize, env: Envelope<M>) -> bool {
        let Some(tx) = self.senders.get(shard) else {
            return false;
        };
        if tx.send(env).is_err() {
            return false;
        }
        self.wake(shard);
        true
    }

    pub fn request_stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        for i in 0..self.wakers.len() {
            self.wake(i);
        }
    }
}

/// Makes the other shards stop when a shard thread unwinds.
pub(crate) struct PanicGuard<M>(pub Arc<Shared<M>>);

impl<M> Drop for PanicGuard<M> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.request_stop();
        }
    }
}

/// A deferred handler call.
pub(crate) enum Event {
    Closed(ConnId, Option<io::Error>),
    Writable(ConnId),
    Connected(ConnId, io::Result<()>),
    /// Deliver stashed bytes (received while paused) after reading resumed.
    Stash(ConnId),
}

/// [`Handoff::target`] of an export (the conn leaves the runtime for the handler).
pub(crate) const EXPORT: usize = usize::MAX;

/// A conn taken out of the runtime ([`Core::export`]), waiting for the handler's
/// `on_exported`.
pub(crate) struct Exported<M> {
    id: ConnId,
    fd: OwnedFd,
    unread: Vec<u8>,
    out: Vec<u8>,
    msg: M,
}

pub(crate) struct Handoff<M> {
    target: usize,
    msg: M,
    pub unread: Vec<u8>,
}

pub(crate) struct Core<M> {
    pub shard: usize,
    pub shards: usize,
    pub backend: Backend,
    pub now: Instant,
    pub conns: Vec<Conn>,
    free: Vec<u32>,
    pub live: usize,
    pub dirty: Vec<u32>,
    pub events: VecDeque<Event>,
    pub handoffs: HashMap<u32, Handoff<M>>,
    /// Exported conns for `on_exported`.
    exported: VecDeque<Exported<M>>,
    /// The handler asked to stop accepting (a live upgrade gave the listener away).
    pub accept_stopped: bool,
    /// Started paused ([`crate::Inherited::paused`]) and not yet told to accept.
    pub accept_paused: bool,
    pub stash: HashMap<u32, Vec<u8>>,
    pub wake_at: Option<Instant>,
    pub shared: Arc<Shared<M>>,
    high: usize,
    low: usize,
    /// (deadline, conn) of conns flushing before close, in deadline order.
    closing: VecDeque<(Instant, ConnId)>,
    pub stopping: bool,
    pub stop_deadline: Option<Instant>,
    pub aborted_all: bool,
    /// This shard's UDP socket (`Config::udp`).
    pub udp: Option<OwnedFd>,
    /// Datagrams dropped (truncated on receive, or not sent).
    pub udp_dropped: u64,
    /// Emptied output queues kept for reuse (at most `POOL_QUEUES`). Boxed because a conn
    /// holds its queue as a `Box`: reusing the box is the point.
    #[allow(clippy::vec_box)]
    pool: Vec<Box<OutQueue>>,
}

impl<M: Send + 'static> Core<M> {
    pub fn new(
        shard: usize,
        shards: usize,
        backend: Backend,
        cfg: &Config,
        shared: Arc<Shared<M>>,
    ) -> Self {
        Core {
            shard,
            shards,
            backend,
            now: Instant::now(),
            conns: Vec::new(),
            free: Vec::new(),
            live: 0,
            dirty: Vec::new(),
            events: VecDeque::new(),
            exported: VecDeque::new(),
            accept_stopped: false,
            accept_paused: false,
            handoffs: HashMap::new(),
            stash: HashMap::new(),
            wake_at: None,
            shared,
            high: cfg.high_watermark,
            low: cfg.low_watermark,
            closing: VecDeque::new(),
            stopping: false,
            stop_deadline: None,
            aborted_all: false,
            udp: None,
            udp_dropped: 0,
            pool: Vec::new(),
        }
    }

    /// Keeps an emptied output queue for the next connection that queues output.
    fn recycle(&mut self, mut q: Box<OutQueue>) {
        if self.pool.len() < POOL_QUEUES && q.reset() {
            self.pool.push(q);
        }
    }

    pub fn wake_fd(&self) -> RawFd {
        self.shared.wakers[self.shard].fd.as_raw_fd()
    }

    // ---- slab ----

    pub fn alloc(&mut self, fd: RawFd, flags: u16) -> ConnId {
        self.live += 1;
        let flags = flags | f::USED;
        if let Some(idx) = self.free.pop() {
            let c = &mut self.conns[idx as usize];
            debug_assert!(c.flags & f::USED == 0 && c.ops == 0 && c.out.is_none());
            c.fd = fd;
            c.flags = flags;
            ConnId { idx, gen: c.gen }
        } else {
            let idx = self.conns.len() as u32;
            self.conns.push(Conn {
                fd,
                gen: 0,
                out: None,
                flags,
                ops: 0,
            });
            ConnId { idx, gen: 0 }
        }
    }

    /// Release a slot (the fd must already be closed or transferred).
    pub fn free(&mut self, idx: u32) {
        let c = &mut self.conns[idx as usize];
        debug_assert!(c.flags & f::USED != 0 && c.ops == 0);
        if c.flags & f::STASH != 0 {
            self.stash.remove(&idx);
        }
        if c.flags & f::HANDOFF != 0 {
            self.handoffs.remove(&idx);
        }
        let out = c.out.take();
        c.flags = 0;
        c.fd = -1;
        c.gen = c.gen.wrapping_add(1);
        self.free.push(idx);
        self.live -= 1;
        if let Some(q) = out {
            self.recycle(q);
        }
    }

    pub fn id(&self, idx: u32) -> ConnId {
        ConnId {
            idx,
            gen: self.conns[idx as usize].gen,
        }
    }

    /// Index of a live (handler-visible) conn.
    pub fn lookup(&self, id: ConnId) -> Option<u32> {
        let c = self.conns.get(id.idx as usize)?;
        (c.gen == id.gen && c.flags & f::USED != 0 && c.flags & f::DEAD == 0).then_some(id.idx)
    }

    pub fn mark_dirty(&mut self, idx: u32) {
        let c = &mut self.conns[idx as usize];
        if c.flags & f::DIRTY == 0 {
            c.flags |= f::DIRTY;
            self.dirty.push(idx);
        }
    }

    // ---- output ----

    fn queue(&mut self, idx: u32, bytes: &[u8]) -> usize {
        let c = &mut self.conns[idx as usize];
        let locked = c.flags & f::SEND != 0;
        if c.out.is_none() {
            c.out = Some(self.pool.pop().unwrap_or_else(|| Box::new(OutQueue::new())));
        }
        let Some(q) = c.out.as_mut() else {
            return 0;
        };
        q.push(bytes, locked);
        q.len()
    }

    /// The backend wrote `n` bytes of the front of the queue.
    pub fn consumed(&mut self, idx: u32, n: usize) {
        let c = &mut self.conns[idx as usize];
        let Some(q) = c.out.as_mut() else { return };
        q.consume(n);
        let left = q.len();
        if left == 0 {
            if let Some(q) = c.out.take() {
                self.recycle(q);
            }
        }
        let c = &mut self.conns[idx as usize];
        if c.flags & f::BP != 0 && left < self.low.max(1) {
            c.flags &= !f::BP;
            if c.flags & f::DEAD == 0 {
                let id = ConnId { idx, gen: c.gen };
                self.events.push_back(Event::Writable(id));
            }
        }
    }

    /// The conn hit EOF (`err == None`, graceful: flush then close) or an error (abort).
    pub fn fail(&mut self, idx: u32, err: Option<io::Error>) {
        let graceful = err.is_none();
        let c = &mut self.conns[idx as usize];
        let id = ConnId { idx, gen: c.gen };
        if c.flags & f::DEAD == 0 {
            c.flags |= f::DEAD | if graceful { f::CLOSING } else { f::ABORT };
            self.events.push_back(Event::Closed(id, err));
            if graceful {
                self.closing.push_back((self.now + CLOSE_FLUSH_TIMEOUT, id));
            }
        } else if !graceful && c.flags & f::HANDOFF == 0 {
            c.flags |= f::ABORT;
        }
        self.mark_dirty(idx);
    }

    // ---- Ctx operations ----

    pub fn send(&mut self, id: ConnId, bytes: &[u8]) -> usize {
        let Some(idx) = self.lookup(id) else { return 0 };
        if bytes.is_empty() {
            return self.conns[idx as usize].out.as_ref().map_or(0, |q| q.len());
        }
        let n = self.queue(idx, bytes);
        if n > self.high {
            self.conns[idx as usize].flags |= f::BP;
        }
        self.mark_dirty(idx);
        n
    }

    /// Output not yet delivered to the peer: bytes in the conn's queue plus what the kernel
    /// holds unsent or unacknowledged (`SIOCOUTQ`). `None` for unknown/closed conns.
    pub fn unsent(&self, id: ConnId) -> Option<usize> {
        let c = &self.conns[self.lookup(id)? as usize];
        let queued = c.out.as_ref().map_or(0, |q| q.len());
        Some(queued + sys::outq(c.fd).unwrap_or(0))
    }

    pub fn is_backpressured(&self, id: ConnId) -> bool {
        self.lookup(id)
            .is_some_and(|idx| self.conns[idx as usize].flags & f::BP != 0)
    }

    pub fn close(&mut self, id: ConnId) {
        let Some(idx) = self.lookup(id) else { return };
        self.conns[idx as usize].flags |= f::DEAD | f::CLOSING;
        self.closing.push_back((self.now + CLOSE_FLUSH_TIMEOUT, id));
        self.mark_dirty(idx);
    }

    pub fn abort(&mut self, id: ConnId) {
        let Some(idx) = self.lookup(id) else { return };
        self.conns[idx as usize].flags |= f::DEAD | f::ABORT;
        self.mark_dirty(idx);
    }

    pub fn set_reading(&mut self, id: ConnId, on: bool) {
        let Some(idx) = self.lookup(id) else { return };
        let c = &mut self.conns[idx as usize];
        if on {
            if c.flags & f::READING == 0 {
                c.flags |= f::READING;
                if c.flags & f::STASH != 0 {
                    self.events.push_back(Event::Stash(id));
                }
            }
        } else {
            c.flags &= !f::READING;
        }
        self.mark_dirty(idx);
    }

    pub fn connect_unix(&mut self, path: &Path) -> io::Result<ConnId> {
        let (sun, len) = sys::unix_sockaddr(path)?;
        let fd = sys::unix_socket()?;
        let res = sys::connect_unix(fd.as_raw_fd(), &sun, len).and_then(|()| {
            if self.backend == Backend::Uring {
                // io_uring drives the socket itself; keep it in blocking mode so the kernel
                // arms internal poll instead of returning EAGAIN.
                sys::set_nonblocking(fd.as_raw_fd(), false)
            } else {
                Ok(())
            }
        });
        match res {
            Ok(()) => {
                let id = self.alloc(fd.into_raw_fd(), f::READING);
                self.events.push_back(Event::Connected(id, Ok(())));
                self.mark_dirty(id.idx);
                Ok(id)
            }
            Err(e) => {
                drop(fd);
                let id = self.alloc(-1, 0);
                self.free(id.idx);
                self.events.push_back(Event::Connected(id, Err(e)));
                Ok(id)
            }
        }
    }

    /// Takes a live conn out of the runtime: like a hand-off, but delivered to this shard's
    /// handler (`on_exported`) with its fd, once no op is in flight on it.
    /// Whether the conn was live (a dead or unknown one is not exported: nothing follows).
    pub fn export(&mut self, id: ConnId, msg: M) -> bool {
        if self.lookup(id).is_none() {
            return false;
        }
        self.hand_off(id, EXPORT, msg);
        true
    }

    /// Takes a connected socket in, `out` queued first; reading starts at once.
    pub fn adopt_fd(&mut self, fd: OwnedFd, out: &[u8]) -> ConnId {
        use std::os::fd::IntoRawFd;
        let raw = fd.into_raw_fd();
        let _ = sys::set_nonblocking(raw, self.backend == crate::Backend::Epoll);
        let id = self.alloc(raw, f::READING);
        if !out.is_empty() {
            let n = self.queue(id.idx, out);
            if n > self.high {
                self.conns[id.idx as usize].flags |= f::BP;
            }
        }
        self.mark_dirty(id.idx);
        id
    }

    pub fn hand_off(&mut self, id: ConnId, target: usize, msg: M) {
        let Some(idx) = self.lookup(id) else { return };
        if target >= self.shards && target != EXPORT {
            tracing::error!(
                target,
                "hand_off to a non-existent shard; aborting the conn"
            );
            self.abort(id);
            return;
        }
        let c = &mut self.conns[idx as usize];
        c.flags |= f::DEAD | f::HANDOFF;
        let unread = if c.flags & f::STASH != 0 {
            c.flags &= !f::STASH;
            self.stash.remove(&idx).unwrap_or_default()
        } else {
            Vec::new()
        };
        self.handoffs.insert(
            idx,
            Handoff {
                target,
                msg,
                unread,
            },
        );
        self.mark_dirty(idx);
    }

    pub fn peer_addr(&self, id: ConnId) -> Option<SocketAddr> {
        let idx = self.lookup(id)?;
        sys::peer_addr(self.conns[idx as usize].fd)
    }

    /// Bytes received for a conn that is paused (or has older paused bytes pending).
    pub fn stash_data(&mut self, idx: u32, data: &[u8]) {
        self.conns[idx as usize].flags |= f::STASH;
        self.stash.entry(idx).or_default().extend_from_slice(data);
    }

    /// All ops are done on a HANDOFF conn: ship fd + unread + queued output to the target and
    /// release the slot without closing the fd.
    pub fn finish_handoff(&mut self, idx: u32) {
        let id = self.id(idx);
        let c = &mut self.conns[idx as usize];
        let raw = c.fd;
        let out = c.out.take().map(|q| q.into_vec()).unwrap_or_default();
        c.flags &= !f::HANDOFF;
        let Some(ho) = self.handoffs.remove(&idx) else {
            sys::close(raw);
            self.free(idx);
            return;
        };
        self.free(idx);
        // SAFETY: the slot owned `raw` exclusively and was released above without closing
        // it, so ownership moves to this OwnedFd exactly once.
        let fd = unsafe { sys::owned(raw) };
        if ho.target == EXPORT {
            self.exported.push_back(Exported {
                id,
                fd,
                unread: ho.unread,
                out,
                msg: ho.msg,
            });
            return;
        }
        let peer = sys::peer_addr(raw).unwrap_or_else(sys::unspecified_addr);
        let env = Envelope::Adopt {
            fd,
            peer,
            unread: ho.unread,
            out,
            msg: ho.msg,
        };
        if !self.shared.send(ho.target, env) {
            tracing::debug!(target = ho.target, "hand-off target is gone; conn closed");
        }
    }

    // ---- loop helpers ----

    /// Drain the mailbox (after the shard's eventfd fired).
    pub fn drain_mailbox<H: Handler<Msg = M>>(&mut self, rx: &Receiver<Envelope<M>>, h: &mut H) {
        self.shared.wakers[self.shard]
            .pending
            .store(false, Ordering::SeqCst);
        for _ in 0..4096 {
            let Ok(env) = rx.try_recv() else { return };
            match env {
                Envelope::Msg(m) => h.on_message(&mut Ctx::new(self), m),
                Envelope::Adopt {
                    fd,
                    peer,
                    unread,
                    out,
                    msg,
                } => {
                    if self.stopping {
                        continue; // drops (closes) the fd
                    }
                    let id = self.alloc(fd.into_raw_fd(), f::READING);
                    if !out.is_empty() {
                        let n = self.queue(id.idx, &out);
                        if n > self.high {
                            self.conns[id.idx as usize].flags |= f::BP;
                        }
                    }
                    self.mark_dirty(id.idx);
                    h.on_adopt(&mut Ctx::new(self), id, peer, unread, msg);
                }
            }
        }
        // More left: make sure we come back for them after serving I/O.
        self.shared.wakers[self.shard]
            .pending
            .store(false, Ordering::SeqCst);
        self.shared.wake(self.shard);
    }

    /// Deliver deferred events.
    pub fn dispatch<H: Handler<Msg = M>>(&mut self, h: &mut H) {
        while let Some(x) = self.exported.pop_front() {
            h.on_exported(&mut Ctx::new(self), x.id, x.fd, x.unread, x.out, x.msg);
        }
        while let Some(ev) = self.events.pop_front() {
            match ev {
                Event::Closed(id, err) => h.on_closed(&mut Ctx::new(self), id, err),
                Event::Writable(id) => {
                    if self.lookup(id).is_some() {
                        h.on_writable(&mut Ctx::new(self), id);
                    }
                }
                Event::Connected(id, res) => {
                    if res.is_err() || self.lookup(id).is_some() {
                        h.on_connected(&mut Ctx::new(self), id, res);
                    }
                }
                Event::Stash(id) => {
                    let Some(idx) = self.lookup(id) else { continue };
                    let c = &mut self.conns[idx as usize];
                    if c.flags & f::READING == 0 || c.flags & f::STASH == 0 {
                        continue;
                    }
                    c.flags &= !f::STASH;
                    if let Some(data) = self.stash.remove(&idx) {
                        h.on_data(&mut Ctx::new(self), id, &data);
                    }
                }
            }
        }
    }

    /// Fire `on_tick`, expire flush-before-close deadlines, escalate a slow shutdown.
    pub fn run_timers<H: Handler<Msg = M>>(&mut self, h: &mut H) {
        if let Some(t) = self.wake_at {
            if self.now >= t {
                self.wake_at = None;
                let now = self.now;
                h.on_tick(&mut Ctx::new(self), now);
            }
        }
        while let Some(&(t, id)) = self.closing.front() {
            if t > self.now {
                break;
            }
            self.closing.pop_front();
            if let Some(c) = self.conns.get_mut(id.idx as usize) {
                if c.gen == id.gen && c.flags & f::USED != 0 && c.flags & f::CLOSING != 0 {
                    tracing::debug!(?id, "close flush timed out; aborting");
                    c.flags |= f::ABORT;
                    self.mark_dirty(id.idx);
                }
            }
        }
        if let Some(d) = self.stop_deadline {
            if !self.aborted_all && self.now >= d {
                self.abort_all();
            }
        }
    }

    /// Earliest internal or user deadline.
    /// The turn is over: the handler's [`Handler::on_turn_end`].
    pub fn end_turn<H: Handler<Msg = M>>(&mut self, h: &mut H) {
        h.on_turn_end(&mut Ctx::new(self));
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        let mut d = self.wake_at;
        let mut consider = |t: Instant| {
            d = Some(match d {
                Some(x) if x <= t => x,
                _ => t,
            })
        };
        if let Some(&(t, _)) = self.closing.front() {
            consider(t);
        }
        if !self.aborted_all {
            if let Some(t) = self.stop_deadline {
                consider(t);
            }
        }
        d
    }

    /// Stop requested: tell the handler, then flush and close every conn.
    pub fn begin_shutdown<H: Handler<Msg = M>>(&mut self, h: &mut H) {
        self.stopping = true;
        h.on_shutdown(&mut Ctx::new(self));
        for idx in 0..self.conns.len() as u32 {
            let c = &mut self.conns[idx as usize];
            if c.flags & f::USED != 0 && c.flags & f::DEAD == 0 {
                c.flags |= f::DEAD | f::CLOSING;
                self.mark_dirty(idx);
            }
        }
        self.stop_deadline = Some(self.now + SHUTDOWN_FLUSH_TIMEOUT);
    }

    fn abort_all(&mut self) {
        self.aborted_all = true;
        for idx in 0..self.conns.len() as u32 {
            let c = &mut self.conns[idx as usize];
            if c.flags & f::USED != 0 {
                if c.flags & f::HANDOFF != 0 {
                    c.flags &= !f::HANDOFF;
                    self.handoffs.remove(&idx);
                }
                c.flags |= f::DEAD | f::ABORT;
                self.mark_dirty(idx);
            }
        }
    }

    /// Run deferred events and drive dirty conns until both are quiet.
    pub fn settle<H: Handler<Msg = M>>(
        &mut self,
        h: &mut H,
        mut drive: impl FnMut(&mut Self, u32),
    ) {
        loop {
            self.dispatch(h);
            if self.dirty.is_empty() {
                if self.events.is_empty() && self.exported.is_empty() {
                    return;
                }
                continue;
            }
            let dirty = std::mem::take(&mut self.dirty);
            for &idx in &dirty {
                drive(self, idx);
            }
            // Reuse the allocation if nothing new was queued meanwhile.
            if self.dirty.is_empty() {
                let mut d = dirty;
                d.clear();
                self.dirty = d;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conn_size() {
        // Documented in README.md: 24 bytes per connection slot, both backends.
        assert_eq!(std::mem::size_of::<Conn>(), 24);
    }

    #[test]
    fn out_queue_order_and_locking() {
        let mut q = OutQueue::new();
        q.push(b"abc", false);
        q.push(b"def", false);
        assert_eq!(q.chunks.len(), 1);
        // Front locked (send in flight): must not append to the front chunk.
        q.push(b"ghi", true);
        assert_eq!(q.chunks.len(), 2);
        q.push(b"jkl", true); // back chunk is not the front: appending is fine
        assert_eq!(q.chunks.len(), 2);
        assert_eq!(q.front(), b"abcdef");
        q.consume(4);
        assert_eq!(q.front(), b"ef");
        assert_eq!(q.len(), 8);
        q.consume(2);
        assert_eq!(q.front(), b"ghijkl");
        assert_eq!(q.into_vec(), b"ghijkl");
    }

    #[test]
    fn recycled_queue_starts_empty_and_keeps_order() {
        let mut q = OutQueue::new();
        q.push(b"old bytes", false);
        q.push(b"more", true);
        q.consume(4);
        assert!(q.reset(), "a small queue is worth pooling");
        assert_eq!(q.len(), 0);
        assert_eq!(q.front(), b"");
        q.push(b"new", false);
        q.push(b"er", true);
        assert_eq!(q.len(), 5);
        assert_eq!(q.front(), b"new");
        q.consume(3);
        assert_eq!(q.front(), b"er");
        q.consume(2);
        assert_eq!(q.len(), 0);
        // A big chunk is not kept.
        q.push(&vec![7u8; 4 * POOL_CHUNK_MAX], false);
        q.consume(4 * POOL_CHUNK_MAX);
        assert!(q.reset());
        assert!(q.spare.capacity() <= POOL_CHUNK_MAX);
    }
}
