//! io_uring backend: one ring per shard thread, multishot accept, multishot recv into a
//! provided-buffer ring (idle conns hold no receive buffer), at most one Send in flight per
//! conn, AsyncCancel for receives, an eventfd Read kept armed for the mailbox, and
//! `submit_with_args` + timespec for timers.
//!
//! Memory-safety invariants (what makes the `unsafe` here sound):
//! * A conn slot (and its fd and output queue) is never freed, reused or closed while
//!   `Conn::ops > 0`, i.e. while a recv or send SQE referencing it is in flight.
//! * The front chunk of an output queue is never modified or freed while a send is in flight
//!   (`OutQueue::push(.., locked)`), so the pointer given to `opcode::Send` stays valid. A
//!   queue goes back to the shard's pool (`Core::recycle`) only once a completed send has
//!   emptied it or its slot is freed (`ops == 0`): no in-flight send references a pooled
//!   queue.
//! * The provided-buffer ring and buffer memory are `mmap`ed once, registered with the ring
//!   and unmapped only after the ring is gone and no op is in flight (leaked otherwise).
//! * The eventfd read buffer is a heap allocation freed only after the ring is gone (leaked
//!   if ops may still be in flight).

use std::io;
use std::mem::ManuallyDrop;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use io_uring::types::{Fd, SubmitArgs, Timespec};
use io_uring::{cqueue, opcode, squeue, IoUring, Probe};

use crate::reactor::{f, Core, Envelope};
use crate::runtime::Driver;
use crate::udp::UdpRx;
use crate::{sys, Config, Ctx, Handler};

use crate::bufring::{BufRing, BGID};

const K_RECV: u64 = 1;
const K_SEND: u64 = 2;
const K_ACCEPT: u64 = 3;
const K_WAKE: u64 = 4;
const K_CANCEL: u64 = 5;
const K_UDP: u64 = 6;

fn ud(kind: u64, idx: u32, gen: u32) -> u64 {
    (kind << 56) | ((gen as u64 & 0xff_ffff) << 32) | idx as u64
}

fn build_ring(entries: u32, cq: u32) -> io::Result<IoUring> {
    let mut last = None;
    for variant in 0..4 {
        let mut b = IoUring::builder();
        b.setup_cqsize(cq);
        match variant {
            0 => {
                b.setup_single_issuer()
                    .setup_defer_taskrun()
                    .setup_submit_all();
            }
            1 => {
                b.setup_single_issuer()
                    .setup_coop_taskrun()
                    .setup_submit_all();
            }
            2 => {
                b.setup_coop_taskrun();
            }
            _ => {}
        }
        match b.build(entries) {
            Ok(r) => {
                tracing::debug!(variant, "io_uring ring set up");
                return Ok(r);
            }
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap())
}

/// Probes on a short-lived thread of its own: tearing a ring down queues task work for the
/// thread that created it, which interrupts that thread's next blocking system call that has a
/// timeout (an `EINTR` with no signal; seen with `recv_from` after the probe). The probe's
/// thread takes that with it when it exits, so callers never see it.
pub(crate) fn probe() -> Result<(), String> {
    std::thread::Builder::new()
        .name("uring-probe".into())
        .spawn(probe_here)
        .map_err(|e| format!("cannot start the io_uring probe thread: {e}"))?
        .join()
        .unwrap_or_else(|_| Err("the io_uring probe panicked".into()))
}

fn probe_here() -> Result<(), String> {
    let ring = IoUring::new(8).map_err(|e| {
        format!(
            "io_uring_setup failed: {e} (kernel without io_uring, kernel.io_uring_disabled \
             sysctl, or a seccomp profile such as Docker's default blocking it)"
        )
    })?;
    if !ring.params().is_feature_ext_arg() {
        return Err("kernel lacks IORING_FEAT_EXT_ARG (needs Linux >= 5.11)".into());
    }
    let mut p = Probe::new();
    ring.submitter()
        .register_probe(&mut p)
        .map_err(|e| format!("IORING_REGISTER_PROBE failed: {e}"))?;
    for (code, name) in [
        (opcode::Accept::CODE, "ACCEPT"),
        (opcode::RecvMulti::CODE, "RECV"),
        (opcode::Send::CODE, "SEND"),
        (opcode::Read::CODE, "READ"),
        (opcode::AsyncCancel::CODE, "ASYNC_CANCEL"),
    ] {
        if !p.is_supported(code) {
            return Err(format!("io_uring opcode IORING_OP_{name} not supported"));
        }
    }
    // Live check: provided-buffer ring + multishot recv (Linux >= 6.0, which also implies
    // multishot accept, 5.19).
    let mut ring = ManuallyDrop::new(ring);
    let mut bufs = ManuallyDrop::new(BufRing::new(2, 64).map_err(|e| format!("mmap: {e}"))?);
    let res = probe_live(&mut ring, &mut bufs);
    // SAFETY: `ring` is not used after this; dropping it tears down all its ops.
    unsafe { ManuallyDrop::drop(&mut ring) };
    if res.is_ok() {
        // SAFETY: probe_live only returns Ok after observing the final CQE of its only
        // buffer-selecting op, and the ring is gone, so nothing references the buffers.
        unsafe { ManuallyDrop::drop(&mut bufs) };
    } // else: leak the (tiny) buffers; an op might still have been in flight.
    res
}

fn probe_live(ring: &mut IoUring, bufs: &mut BufRing) -> Result<(), String> {
    // SAFETY: the caller keeps `bufs` alive until the ring is dropped (or leaks it).
    unsafe { bufs.register(ring) }
        .map_err(|e| format!("provided-buffer rings unsupported (needs Linux >= 5.19): {e}"))?;
    let (a, b) = sys::socketpair().map_err(|e| format!("socketpair: {e}"))?;
    let e = opcode::RecvMulti::new(Fd(a.as_raw_fd()), BGID)
        .build()
        .user_data(1);
    // SAFETY: RecvMulti references only the registered buffer ring (kept alive by the caller)
    // and the fd `a`, which outlives the op (it is closed only after the final CQE).
    unsafe { ring.submission().push(&e) }.map_err(|_| "submission queue full".to_string())?;
    sys::send(b.as_raw_fd(), b"x").map_err(|e| format!("socketpair write: {e}"))?;
    let wait = |ring: &mut IoUring| -> Result<(i32, u32), String> {
        let ts = Timespec::from(Duration::from_secs(2));
        let args = SubmitArgs::new().timespec(&ts);
        match ring.submitter().submit_with_args(1, &args) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ETIME) => {}
            Err(e) => return Err(format!("io_uring_enter: {e}")),
        }
        let cqe = ring
            .completion()
            .next()
            .ok_or_else(|| "no completion from multishot recv within 2 s".to_string())?;
        Ok((cqe.result(), cqe.flags()))
    };
    let (res, flags) = wait(ring)?;
    if res < 0 {
        return Err(format!(
            "multishot recv unsupported (needs Linux >= 6.0): {}",
            io::Error::from_raw_os_error(-res)
        ));
    }
    let more = cqueue::more(flags);
    if res != 1 || cqueue::buffer_select(flags).is_none() {
        return Err("multishot recv with provided buffers misbehaved".into());
    }
    drop(b); // EOF ends the multishot recv
    if more {
        let (res, flags) = wait(ring)?;
        if cqueue::more(flags) || res < 0 {
            return Err("multishot recv did not terminate on EOF".into());
        }
    } else {
        return Err("recv did not stay armed (no multishot support)".into());
    }
    drop(a);
    Ok(())
}

/// One listening socket of the shard and its multishot accept.
struct Listener {
    /// Closed (None) once its accept has ended for good.
    fd: Option<OwnedFd>,
    armed: bool,
    retry_at: Option<Instant>,
}

pub(crate) struct UringShard {
    ring: ManuallyDrop<IoUring>,
    bufs: ManuallyDrop<BufRing>,
    /// By listener index (the user data of its accept).
    listeners: Vec<Listener>,
    /// `stop_accepting` was acted on.
    accept_released: bool,
    wake_fd: RawFd,
    wake_armed: bool,
    /// Target of the armed eventfd Read (heap, stable address).
    wake_buf: *mut u64,
    /// Non-conn ops in flight (accept, wake read).
    misc_ops: u32,
    cqes: Vec<(u64, i32, u32)>,
    /// The shard's UDP socket (owned by `Core`) and its receive side.
    udp_fd: Option<RawFd>,
    udp: Option<UdpRx>,
    /// A multishot poll for the UDP socket is armed.
    udp_armed: bool,
    /// The last drain spent its budget: more datagrams may be waiting.
    udp_more: bool,
    fatal: Option<io::Error>,
    /// Ops may still be in flight at drop: leak buffers rather than free them.
    leak: bool,
}

impl Driver for UringShard {
    fn new(
        cfg: &Config,
        listeners: Vec<Option<OwnedFd>>,
        wake_fd: RawFd,
        udp_fd: Option<RawFd>,
    ) -> io::Result<Self> {
        let ring = ManuallyDrop::new(build_ring(1024, 16384)?);
        let mut bufs = ManuallyDrop::new(BufRing::new(cfg.bufs_per_shard, cfg.buf_size)?);
        // SAFETY: `bufs` lives in the same struct as `ring`; Drop drops the ring first and
        // frees the buffers only when no op is in flight.
        if let Err(e) = unsafe { bufs.register(&ring) } {
            // Not registered: the buffers can go; dropping the ring is fine too.
            let mut ring = ring;
            // SAFETY: never used again.
            unsafe {
                ManuallyDrop::drop(&mut ring);
                ManuallyDrop::drop(&mut bufs);
            }
            return Err(e);
        }
        for l in listeners.iter().flatten() {
            sys::set_nonblocking(l.as_raw_fd(), false)?;
        }
        Ok(UringShard {
            ring,
            bufs,
            listeners: listeners
                .into_iter()
                .map(|fd| Listener {
                    fd,
                    armed: false,
                    retry_at: None,
                })
                .collect(),
            accept_released: false,
            wake_fd,
            wake_armed: false,
            wake_buf: Box::into_raw(Box::new(0u64)),
            misc_ops: 0,
            cqes: Vec::with_capacity(1024),
            udp_fd,
            udp: udp_fd.map(|_| UdpRx::new()),
            udp_armed: false,
            udp_more: false,
            fatal: None,
            leak: false,
        })
    }

    fn leaked(&self) -> bool {
        self.leak
    }

    fn run<H: Handler>(
        &mut self,
        core: &mut Core<H::Msg>,
        rx: &Receiver<Envelope<H::Msg>>,
        h: &mut H,
    ) -> io::Result<()> {
        core.now = Instant::now();
        h.on_start(&mut Ctx::new(core));
        let mut teardown_deadline: Option<Instant> = None;
        let mut hard_deadline: Option<Instant> = None;
        loop {
            if !core.stopping && core.shared.stop.load(Ordering::SeqCst) {
                core.begin_shutdown(h);
                self.end_accepts();
                hard_deadline = Some(core.now + Duration::from_secs(4));
            }
            if core.accept_stopped && !self.accept_released {
                // The listening sockets went to another process: stop taking connections and
                // datagrams from them (what the kernel queued stays queued for it).
                self.accept_released = true;
                // `on_accept_stopped` comes with the last armed accept's final CQE.
                if !self.end_accepts() && !core.stopping {
                    h.on_accept_stopped(&mut Ctx::new(core));
                }
                if self.udp_armed {
                    self.cancel(K_UDP << 56);
                }
                self.udp_more = false;
            }
            core.settle(h, |c, idx| self.drive(c, idx));
            if let Some(e) = self.fatal.take() {
                self.leak = true;
                return Err(e);
            }
            if !self.wake_armed && teardown_deadline.is_none() {
                let e = opcode::Read::new(Fd(self.wake_fd), self.wake_buf as *mut u8, 8)
                    .build()
                    .user_data(K_WAKE << 56);
                // SAFETY: `wake_buf` is a live heap allocation freed only after the ring is
                // gone (or leaked); the eventfd is owned by `Shared`, which outlives us.
                unsafe { self.push(e) };
                self.wake_armed = true;
                self.misc_ops += 1;
            }
            if !core.stopping && !core.accept_stopped && !core.accept_paused {
                for i in 0..self.listeners.len() {
                    let l = &mut self.listeners[i];
                    let Some(fd) = l.fd.as_ref().map(|f| f.as_raw_fd()) else {
                        continue;
                    };
                    if l.armed || l.retry_at.is_some_and(|t| core.now < t) {
                        continue;
                    }
                    l.retry_at = None;
                    l.armed = true;
                    let e = opcode::AcceptMulti::new(Fd(fd))
                        .flags(libc::SOCK_CLOEXEC)
                        .build()
                        .user_data(ud(K_ACCEPT, i as u32, 0));
                    // SAFETY: references only the listener fd, which is closed only after
                    // the accept's final CQE (`Listener::fd` is dropped then).
                    unsafe { self.push(e) };
                    self.misc_ops += 1;
                }
            }
            if !core.stopping && !core.accept_stopped && !core.accept_paused && !self.udp_armed {
                if let Some(fd) = self.udp_fd {
                    let e = opcode::PollAdd::new(Fd(fd), libc::POLLIN as u32)
                        .multi(true)
                        .build()
                        .user_data(K_UDP << 56);
                    // SAFETY: references only the UDP fd, owned by `Core`, which outlives
                    // this backend (the ring is dropped first).
                    unsafe { self.push(e) };
                    self.udp_armed = true;
                    self.misc_ops += 1;
                }
            }
            if self.udp_more && !core.stopping && !core.accept_stopped {
                if let Some(u) = self.udp.as_mut() {
                    self.udp_more = u.drain(core, h);
                }
                core.settle(h, |c, idx| self.drive(c, idx));
            }
            if core.stopping && core.live == 0 {
                if self.misc_ops == 0 {
                    break;
                }
                match teardown_deadline {
                    None => {
                        teardown_deadline = Some(core.now + Duration::from_secs(1));
                        if self.wake_armed {
                            self.cancel(K_WAKE << 56);
                        }
                        self.end_accepts();
                        if self.udp_armed {
                            self.cancel(K_UDP << 56);
                        }
                    }
                    Some(t) if core.now >= t => {
                        self.leak = true;
                        break;
                    }
                    Some(_) => {}
                }
            }
            if let Some(t) = hard_deadline {
                if core.now >= t {
                    tracing::warn!(shard = core.shard, "shutdown did not finish in time");
                    self.leak = true;
                    break;
                }
            }
            let mut deadline = core.next_deadline();
            let retry = self.listeners.iter().filter_map(|l| l.retry_at).min();
            for t in [retry, teardown_deadline, hard_deadline]
                .into_iter()
                .flatten()
            {
                deadline = Some(deadline.map_or(t, |d| d.min(t)));
            }
            if self.udp_more {
                // Datagrams are waiting: poll the ring without sleeping.
                deadline = Some(core.now);
            }
            self.wait(deadline)?;
            core.now = Instant::now();
            self.cqes.clear();
            for c in self.ring.completion() {
                self.cqes.push((c.user_data(), c.result(), c.flags()));
            }
            for i in 0..self.cqes.len() {
                let (u, res, fl) = self.cqes[i];
                self.complete(core, rx, h, u, res, fl);
            }
            core.run_timers(h);
            core.end_turn(h);
        }
        Ok(())
    }
}

impl UringShard {
    /// Queue an SQE, submitting first if the SQ is full.
    ///
    /// # Safety
    /// Every pointer inside `e` must stay valid until the op's final CQE.
    unsafe fn push(&mut self, e: squeue::Entry) {
        for _ in 0..1000 {
            // SAFETY: forwarded to the caller.
            if unsafe { self.ring.submission().push(&e) }.is_ok() {
                return;
            }
            match self.ring.submit() {
                Ok(_) => {}
                Err(err) if matches!(err.raw_os_error(), Some(libc::EBUSY | libc::EINTR)) => {}
                Err(err) => {
                    self.fatal = Some(err);
                    return;
                }
            }
        }
        self.fatal = Some(io::Error::other("io_uring submission queue stuck full"));
    }

    /// Ends every listener's accept: cancels the armed ones (each closes its socket with its
    /// final CQE) and closes the others now. Returns whether any accept was still armed.
    fn end_accepts(&mut self) -> bool {
        let mut armed = false;
        for i in 0..self.listeners.len() {
            if self.listeners[i].armed {
                armed = true;
                self.cancel(ud(K_ACCEPT, i as u32, 0));
            } else {
                self.listeners[i].fd = None;
            }
        }
        armed
    }

    fn cancel(&mut self, target: u64) {
        let e = opcode::AsyncCancel::new(target)
            .build()
            .user_data(K_CANCEL << 56);
        // SAFETY: AsyncCancel references no memory.
        unsafe { self.push(e) };
    }

    fn wait(&mut self, deadline: Option<Instant>) -> io::Result<()> {
        let r = match deadline {
            None => self.ring.submit_and_wait(1),
            Some(d) => {
                let ts = Timespec::from(d.saturating_duration_since(Instant::now()));
                let args = SubmitArgs::new().timespec(&ts);
                self.ring.submitter().submit_with_args(1, &args)
            }
        };
        match r {
            Ok(_) => Ok(()),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ETIME | libc::EINTR | libc::EBUSY)
                ) =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    fn complete<H: Handler>(
        &mut self,
        core: &mut Core<H::Msg>,
        rx: &Receiver<Envelope<H::Msg>>,
        h: &mut H,
        u: u64,
        res: i32,
        flags: u32,
    ) {
        match u >> 56 {
            K_WAKE => {
                self.misc_ops -= 1;
                self.wake_armed = false;
                if res != -libc::ECANCELED {
                    core.drain_mailbox(rx, h);
                }
            }
            K_ACCEPT => {
                let which = (u & 0xffff_ffff) as usize;
                if res >= 0 {
                    if core.stopping {
                        sys::close(res);
                    } else {
                        sys::set_nodelay(res);
                        let peer = sys::peer_addr(res).unwrap_or_else(sys::unspecified_addr);
                        let id = core.alloc(res, f::READING);
                        core.mark_dirty(id.index());
                        h.on_accept_at(&mut Ctx::new(core), id, peer, which);
                    }
                } else if res != -libc::ECANCELED {
                    tracing::warn!(
                        shard = core.shard,
                        "accept failed: {}",
                        io::Error::from_raw_os_error(-res)
                    );
                }
                if !cqueue::more(flags) {
                    self.misc_ops -= 1;
                    let Some(l) = self.listeners.get_mut(which) else {
                        return;
                    };
                    l.armed = false;
                    if core.stopping || core.accept_stopped {
                        l.fd = None;
                        let last = self.listeners.iter().all(|l| !l.armed);
                        if last && core.accept_stopped && !core.stopping {
                            h.on_accept_stopped(&mut Ctx::new(core));
                        }
                    } else if res < 0 {
                        // e.g. EMFILE: back off a little instead of spinning.
                        l.retry_at = Some(core.now + Duration::from_millis(50));
                    }
                }
            }
            K_UDP => {
                if !cqueue::more(flags) {
                    self.misc_ops -= 1;
                    self.udp_armed = false;
                }
                if res > 0 && !core.stopping && !core.accept_stopped {
                    if let Some(u) = self.udp.as_mut() {
                        self.udp_more = u.drain(core, h);
                    }
                } else if res < 0 && res != -libc::ECANCELED {
                    tracing::warn!(
                        shard = core.shard,
                        "udp poll failed: {}",
                        io::Error::from_raw_os_error(-res)
                    );
                }
            }
            K_RECV => self.recv_done(core, h, u as u32, res, flags),
            K_SEND => {
                let idx = u as u32;
                let c = &mut core.conns[idx as usize];
                debug_assert!(c.flags & f::SEND != 0 && c.ops > 0);
                c.ops -= 1;
                c.flags &= !(f::SEND | f::CANCEL_SEND);
                if res > 0 {
                    core.consumed(idx, res as usize);
                } else if res != -libc::ECANCELED {
                    let err = if res == 0 {
                        io::Error::from(io::ErrorKind::WriteZero)
                    } else {
                        io::Error::from_raw_os_error(-res)
                    };
                    core.fail(idx, Some(err));
                }
                core.mark_dirty(idx);
            }
            _ => {} // AsyncCancel results
        }
    }

    fn recv_done<H: Handler>(
        &mut self,
        core: &mut Core<H::Msg>,
        h: &mut H,
        idx: u32,
        res: i32,
        flags: u32,
    ) {
        let bid = cqueue::buffer_select(flags);
        let c = &mut core.conns[idx as usize];
        debug_assert!(c.flags & f::USED != 0 && c.flags & f::RECV != 0);
        if !cqueue::more(flags) {
            c.ops -= 1;
            c.flags &= !(f::RECV | f::CANCEL_RECV);
            core.mark_dirty(idx);
        }
        let cf = core.conns[idx as usize].flags;
        if res > 0 {
            let Some(bid) = bid else {
                debug_assert!(false, "recv data without a buffer");
                return;
            };
            let data = self.bufs.data(bid, res as usize);
            if cf & f::DEAD != 0 {
                if cf & f::HANDOFF != 0 {
                    if let Some(ho) = core.handoffs.get_mut(&idx) {
                        ho.unread.extend_from_slice(data);
                    }
                }
            } else if cf & f::READING == 0 || cf & f::STASH != 0 {
                core.stash_data(idx, data);
            } else {
                let id = core.id(idx);
                h.on_data(&mut Ctx::new(core), id, data);
            }
            self.bufs.recycle(bid);
            return;
        }
        if let Some(bid) = bid {
            self.bufs.recycle(bid);
        }
        if res == 0 {
            if cf & f::DEAD != 0 {
                // The peer finished: a lingering close may complete.
                core.conns[idx as usize].flags |= f::EOF;
                core.mark_dirty(idx);
            } else {
                if cf & f::READING == 0 || cf & f::STASH != 0 {
                    // Deliver what was stashed first; drive reports EOF afterwards.
                    core.conns[idx as usize].flags |= f::EOF;
                } else {
                    core.fail(idx, None);
                }
            }
        } else if res != -libc::ECANCELED && res != -libc::ENOBUFS {
            // ENOBUFS: buffers are all back by the time drive re-arms the recv.
            core.fail(idx, Some(io::Error::from_raw_os_error(-res)));
        }
    }

    /// Bring in-flight ops of a conn in line with its flags; close/free/hand off when done.
    fn drive<M: Send + 'static>(&mut self, core: &mut Core<M>, idx: u32) {
        if self.fatal.is_some() {
            return;
        }
        let c = &mut core.conns[idx as usize];
        if c.flags & f::USED == 0 {
            return;
        }
        c.flags &= !f::DIRTY;
        let (fd, gen) = (c.fd, c.gen);
        if c.flags & (f::DEAD | f::READING | f::EOF | f::STASH) == f::READING | f::EOF {
            core.fail(idx, None);
            return; // fail() marked it dirty again
        }
        let lingering = crate::reactor::linger(c);
        let want_recv = c.flags & (f::DEAD | f::READING | f::EOF) == f::READING || lingering;
        if c.flags & f::RECV != 0 && !want_recv && c.flags & f::CANCEL_RECV == 0 {
            c.flags |= f::CANCEL_RECV;
            self.cancel(ud(K_RECV, idx, gen));
        } else if c.flags & f::RECV == 0 && want_recv {
            c.flags |= f::RECV;
            c.ops += 1;
            let e = opcode::RecvMulti::new(Fd(fd), BGID)
                .build()
                .user_data(ud(K_RECV, idx, gen));
            // SAFETY: references the fd (closed only when ops == 0) and the registered buffer
            // ring (alive as long as the ring).
            unsafe { self.push(e) };
        }
        let c = &mut core.conns[idx as usize];
        if c.flags & f::ABORT != 0 {
            if c.flags & f::SEND != 0 {
                if c.flags & f::CANCEL_SEND == 0 {
                    c.flags |= f::CANCEL_SEND;
                    self.cancel(ud(K_SEND, idx, gen));
                }
            } else {
                c.out = None;
            }
        } else if c.flags & f::HANDOFF != 0 {
            // Leaving this shard: a send the peer is slow to take must not hold the hand-off
            // up. Cancelled, it reports what it sent; the rest moves with the conn.
            if c.flags & (f::SEND | f::CANCEL_SEND) == f::SEND {
                c.flags |= f::CANCEL_SEND;
                self.cancel(ud(K_SEND, idx, gen));
            }
        } else if c.flags & f::SEND == 0 {
            if let Some(q) = c.out.as_deref() {
                let buf = q.front();
                let len = buf.len().min(1 << 30) as u32;
                let e = opcode::Send::new(Fd(fd), buf.as_ptr(), len)
                    .flags(libc::MSG_NOSIGNAL)
                    .build()
                    .user_data(ud(K_SEND, idx, gen));
                c.flags |= f::SEND;
                c.ops += 1;
                // SAFETY: `buf` is the front chunk of the conn's boxed output queue; with SEND
                // set the chunk is neither modified nor freed, and the queue/slot is not
                // dropped, until this op's CQE has been processed.
                unsafe { self.push(e) };
            }
        }
        let c = &mut core.conns[idx as usize];
        let lingering = crate::reactor::linger(c);
        if c.flags & f::DEAD != 0 && c.ops == 0 {
            if c.flags & f::HANDOFF != 0 {
                core.finish_handoff(idx);
            } else if lingering {
                // Output flushed, write side shut, receive armed above: wait for the EOF.
            } else if c.flags & f::ABORT != 0 || c.out.is_none() {
                sys::close(fd);
                core.free(idx);
            }
        }
    }
}

impl Drop for UringShard {
    fn drop(&mut self) {
        // SAFETY: the ring is never used after this point; dropping it first means the kernel
        // no longer accepts new work referencing our buffers.
        unsafe { ManuallyDrop::drop(&mut self.ring) };
        if self.leak || std::thread::panicking() {
            // Ops may have been in flight when the ring went away; their teardown is
            // asynchronous in the kernel, so keep the memory they might touch.
            return;
        }
        // SAFETY: clean exit: every op completed (misc_ops == 0, all slots freed) and the ring
        // is gone, so the kernel references neither the buffers nor `wake_buf`.
        unsafe {
            ManuallyDrop::drop(&mut self.bufs);
            drop(Box::from_raw(self.wake_buf));
        }
    }
}
