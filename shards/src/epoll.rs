//! epoll backend: level-triggered, non-blocking sockets, one per-shard scratch buffer for
//! reads (idle conns hold no buffer), EPOLLOUT registered only while a queue is non-empty.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::time::Instant;

use crossbeam_channel::Receiver;

use crate::reactor::{f, Core, Envelope};
use crate::runtime::Driver;
use crate::udp::UdpRx;
use crate::{sys, Config, Ctx, Handler};

const TOK_WAKE: u64 = 1 << 62;
const TOK_LISTEN: u64 = 1 << 63;
const TOK_UDP: u64 = 1 << 61;

fn conn_token(idx: u32, gen: u32) -> u64 {
    ((gen as u64 & 0x3fff_ffff) << 32) | idx as u64
}

pub(crate) struct EpollShard {
    ep: OwnedFd,
    /// By listener index.
    listeners: Vec<Option<OwnedFd>>,
    /// The listeners and UDP socket joined the epoll set (the shard accepts).
    registered: bool,
    /// `stop_accepting` was acted on.
    released: bool,
    wake_fd: RawFd,
    scratch: Vec<u8>,
    events: Vec<libc::epoll_event>,
    /// Datagram receive buffers (only with a UDP socket).
    udp: Option<UdpRx>,
    /// The UDP socket polled (owned by the core), until released.
    udp_fd: Option<RawFd>,
}

fn ctl(ep: RawFd, op: libc::c_int, fd: RawFd, events: u32, data: u64) -> io::Result<()> {
    let mut ev = libc::epoll_event { events, u64: data };
    // SAFETY: `ev` is a live epoll_event; epoll_ctl only reads it.
    sys::cvt(unsafe { libc::epoll_ctl(ep, op, fd, &mut ev) }).map(drop)
}

impl Driver for EpollShard {
    fn new(
        cfg: &Config,
        listeners: Vec<Option<OwnedFd>>,
        wake_fd: RawFd,
        udp_fd: Option<RawFd>,
    ) -> io::Result<Self> {
        // SAFETY: plain syscall; the result is checked and immediately owned.
        let ep = unsafe { sys::owned(sys::cvt(libc::epoll_create1(libc::EPOLL_CLOEXEC))?) };
        ctl(
            ep.as_raw_fd(),
            libc::EPOLL_CTL_ADD,
            wake_fd,
            libc::EPOLLIN as u32,
            TOK_WAKE,
        )?;
        for l in listeners.iter().flatten() {
            sys::set_nonblocking(l.as_raw_fd(), true)?;
        }
        // The listener and the UDP socket join the epoll set when the shard starts accepting
        // (`register_listeners`).
        Ok(EpollShard {
            ep,
            listeners,
            wake_fd,
            scratch: vec![0u8; cfg.buf_size],
            events: vec![libc::epoll_event { events: 0, u64: 0 }; 1024],
            udp: udp_fd.map(|_| UdpRx::new()),
            udp_fd,
            registered: false,
            released: false,
        })
    }

    fn run<H: Handler>(
        &mut self,
        core: &mut Core<H::Msg>,
        rx: &Receiver<Envelope<H::Msg>>,
        h: &mut H,
    ) -> io::Result<()> {
        core.now = Instant::now();
        h.on_start(&mut Ctx::new(core));
        loop {
            if !core.stopping && core.shared.stop.load(std::sync::atomic::Ordering::SeqCst) {
                core.begin_shutdown(h);
                self.release_listeners(); // stop accepting
            }
            if core.accept_stopped && !self.released {
                // The listening sockets went to another process.
                self.released = true;
                self.release_listeners();
                if !core.stopping {
                    h.on_accept_stopped(&mut Ctx::new(core));
                }
            }
            if !self.registered && !core.accept_paused && !core.accept_stopped && !core.stopping {
                self.registered = true;
                self.register_listeners()?;
            }
            core.settle(h, |c, idx| self.drive(c, idx));
            if core.stopping && core.live == 0 {
                return Ok(());
            }
            let timeout = match core.next_deadline() {
                None => -1,
                Some(d) => {
                    let now = Instant::now();
                    if d <= now {
                        0
                    } else {
                        // Round up so we never wake before the deadline.
                        let us = (d - now).as_micros();
                        us.div_ceil(1000).min(i32::MAX as u128) as i32
                    }
                }
            };
            // SAFETY: `events` is a live buffer of `len` epoll_event entries.
            let n = unsafe {
                libc::epoll_wait(
                    self.ep.as_raw_fd(),
                    self.events.as_mut_ptr(),
                    self.events.len() as i32,
                    timeout,
                )
            };
            core.now = Instant::now();
            let n = if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
                0
            } else {
                n as usize
            };
            for i in 0..n {
                let ev = self.events[i];
                let (bits, data) = (ev.events, ev.u64);
                if data == TOK_WAKE {
                    sys::eventfd_read(self.wake_fd);
                    core.drain_mailbox(rx, h);
                } else if data & TOK_LISTEN != 0 {
                    self.accept(core, h, (data & 0xffff) as usize);
                } else if data == TOK_UDP {
                    if let Some(u) = self.udp.as_mut() {
                        u.drain(core, h);
                    }
                } else {
                    self.conn_event(core, h, data as u32, (data >> 32) as u32, bits);
                }
            }
            core.run_timers(h);
            core.end_turn(h);
        }
    }
}

impl EpollShard {
    /// Stops polling the listener and the UDP socket and closes this shard's listener. Removed
    /// from the epoll set explicitly: another fd (a copy kept for a live upgrade) may keep the
    /// socket open, and with it the registration.
    fn register_listeners(&mut self) -> io::Result<()> {
        for (i, l) in self.listeners.iter().enumerate() {
            if let Some(l) = l {
                ctl(
                    self.ep.as_raw_fd(),
                    libc::EPOLL_CTL_ADD,
                    l.as_raw_fd(),
                    libc::EPOLLIN as u32,
                    TOK_LISTEN | i as u64,
                )?;
            }
        }
        if let Some(u) = self.udp_fd {
            // Level-triggered: a batch left unread (budget spent) is reported again.
            ctl(
                self.ep.as_raw_fd(),
                libc::EPOLL_CTL_ADD,
                u,
                libc::EPOLLIN as u32,
                TOK_UDP,
            )?;
        }
        Ok(())
    }

    fn release_listeners(&mut self) {
        for l in self.listeners.iter_mut().filter_map(Option::take) {
            let _ = ctl(
                self.ep.as_raw_fd(),
                libc::EPOLL_CTL_DEL,
                l.as_raw_fd(),
                0,
                0,
            );
        }
        if let Some(u) = self.udp_fd.take() {
            let _ = ctl(self.ep.as_raw_fd(), libc::EPOLL_CTL_DEL, u, 0, 0);
            self.udp = None;
        }
    }

    fn accept<H: Handler>(&mut self, core: &mut Core<H::Msg>, h: &mut H, which: usize) {
        let Some(Some(l)) = self.listeners.get(which) else {
            return;
        };
        let lfd = l.as_raw_fd();
        for _ in 0..128 {
            match sys::accept(lfd) {
                Ok((fd, peer)) => {
                    if core.stopping {
                        continue;
                    }
                    sys::set_nodelay(fd.as_raw_fd());
                    let id = core.alloc(std::os::fd::IntoRawFd::into_raw_fd(fd), f::READING);
                    core.mark_dirty(id.index());
                    h.on_accept_at(&mut Ctx::new(core), id, peer, which);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // ECONNABORTED and friends: skip; EMFILE: back off until the next event.
                    tracing::warn!(shard = core.shard, "accept failed: {e}");
                    return;
                }
            }
        }
    }

    fn conn_event<H: Handler>(
        &mut self,
        core: &mut Core<H::Msg>,
        h: &mut H,
        idx: u32,
        gen: u32,
        bits: u32,
    ) {
        let Some(c) = core.conns.get(idx as usize) else {
            return;
        };
        if c.flags & f::USED == 0 || (c.gen & 0x3fff_ffff) != gen {
            return;
        }
        let flags = c.flags;
        let errbits = (libc::EPOLLERR | libc::EPOLLHUP) as u32;
        if bits & (libc::EPOLLOUT as u32 | errbits) != 0 {
            core.mark_dirty(idx);
        }
        if bits & ((libc::EPOLLIN | libc::EPOLLRDHUP) as u32 | errbits) == 0 {
            return;
        }
        if flags & f::DEAD == 0 && flags & f::READING != 0 {
            self.read(core, h, idx);
        } else if flags & f::LINGER != 0 {
            self.drain(core, idx);
        } else if bits & errbits != 0 && flags & f::HANDOFF == 0 {
            let fd = core.conns[idx as usize].fd;
            let err = sys::take_error(fd)
                .unwrap_or_else(|| io::Error::from(io::ErrorKind::ConnectionReset));
            core.fail(idx, Some(err));
        }
    }

    /// A lingering close: read and discard until EOF (or the close deadline aborts it).
    fn drain<M: Send + 'static>(&mut self, core: &mut Core<M>, idx: u32) {
        let fd = core.conns[idx as usize].fd;
        loop {
            match sys::recv(fd, &mut self.scratch) {
                Ok(0) => {
                    core.conns[idx as usize].flags |= f::EOF;
                    core.mark_dirty(idx);
                    return;
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(_) => {
                    core.conns[idx as usize].flags |= f::EOF | f::ABORT;
                    core.mark_dirty(idx);
                    return;
                }
            }
        }
    }

    fn read<H: Handler>(&mut self, core: &mut Core<H::Msg>, h: &mut H, idx: u32) {
        let id = core.id(idx);
        for _ in 0..8 {
            let fd = core.conns[idx as usize].fd;
            match sys::recv(fd, &mut self.scratch) {
                Ok(0) => {
                    core.fail(idx, None);
                    return;
                }
                Ok(n) => {
                    h.on_data(&mut Ctx::new(core), id, &self.scratch[..n]);
                    if n < self.scratch.len() {
                        return;
                    }
                    let c = &core.conns[idx as usize];
                    if c.gen != id.generation()
                        || c.flags & (f::USED | f::DEAD | f::READING) != f::USED | f::READING
                    {
                        return;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    core.fail(idx, Some(e));
                    return;
                }
            }
        }
    }

    /// Bring the kernel state of a conn in line with its flags.
    fn drive<M: Send + 'static>(&mut self, core: &mut Core<M>, idx: u32) {
        let ep = self.ep.as_raw_fd();
        let c = &mut core.conns[idx as usize];
        if c.flags & f::USED == 0 {
            return;
        }
        c.flags &= !f::DIRTY;
        let fd = c.fd;
        if c.flags & f::HANDOFF != 0 {
            if c.flags & f::REG != 0 {
                let _ = ctl(ep, libc::EPOLL_CTL_DEL, fd, 0, 0);
            }
            c.flags &= !(f::REG | f::RECV | f::SEND);
            core.finish_handoff(idx);
            return;
        }
        if c.flags & f::ABORT == 0 {
            while let Some(q) = core.conns[idx as usize].out.as_deref() {
                match sys::send(fd, q.front()) {
                    Ok(n) => core.consumed(idx, n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        core.fail(idx, Some(e));
                        break;
                    }
                }
            }
        }
        let c = &mut core.conns[idx as usize];
        let lingering = crate::reactor::linger(c);
        if c.flags & f::ABORT != 0 || (c.flags & f::DEAD != 0 && c.out.is_none() && !lingering) {
            // close(2) also removes the fd from the epoll set.
            sys::close(fd);
            core.free(idx);
            return;
        }
        let mut want = 0u32;
        let mut want_flags = 0u16;
        if c.flags & (f::DEAD | f::READING) == f::READING || lingering {
            want |= (libc::EPOLLIN | libc::EPOLLRDHUP) as u32;
            want_flags |= f::RECV;
        }
        if c.out.is_some() {
            want |= libc::EPOLLOUT as u32;
            want_flags |= f::SEND;
        }
        let tok = conn_token(idx, c.gen);
        if c.flags & f::REG == 0 {
            match ctl(ep, libc::EPOLL_CTL_ADD, fd, want, tok) {
                Ok(()) => c.flags |= f::REG,
                Err(e) => {
                    core.fail(idx, Some(e));
                    core.conns[idx as usize].flags |= f::ABORT;
                    core.mark_dirty(idx);
                    return;
                }
            }
        } else if c.flags & (f::RECV | f::SEND) != want_flags {
            if let Err(e) = ctl(ep, libc::EPOLL_CTL_MOD, fd, want, tok) {
                core.fail(idx, Some(e));
                return;
            }
        }
        let c = &mut core.conns[idx as usize];
        c.flags = (c.flags & !(f::RECV | f::SEND)) | want_flags;
    }
}
