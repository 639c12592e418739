//! Datagrams: one SO_REUSEPORT UDP socket per shard, all bound to the same port.
//!
//! The kernel spreads datagrams over the shards' sockets by a hash of the 4-tuple, unless the
//! application attaches a classic BPF program ([`Config::udp_steering`](crate::Config)) that
//! picks the socket (= the shard: sockets join the group in shard order) from the datagram's
//! bytes. That is how a protocol whose connections outlive the client's address (QUIC
//! connection migration) keeps every packet of a connection on the shard that owns it. A
//! program's result that is not a valid socket index falls back to the hash.
//!
//! Receiving is batched with `recvmmsg` into one per-shard buffer of [`BATCH`] ×
//! [`DGRAM_MAX`] bytes; the backends call [`UdpRx::drain`] when the socket is readable (epoll:
//! level-triggered readiness; io_uring: a multishot poll). There is one socket per shard, not
//! per peer, so there is nothing to gain from provided buffers here: the buffer is per shard
//! whatever the number of peers. Sending is a direct non-blocking `sendto`: a datagram that
//! does not fit the socket buffer is dropped and counted, which datagram protocols expect.

use std::io;
use std::mem;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use crate::reactor::Core;
use crate::{sys, Ctx, Handler};

/// Datagrams received per `recvmmsg` call.
pub(crate) const BATCH: usize = 32;
/// Largest datagram received; longer ones are truncated by the kernel and dropped here.
pub(crate) const DGRAM_MAX: usize = 2048;
/// Datagrams handled per readiness event before the loop serves other work.
pub(crate) const BUDGET: usize = 256;

/// One instruction of a classic BPF program (`struct sock_filter`).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct BpfInsn {
    pub code: u16,
    pub jt: u8,
    pub jf: u8,
    pub k: u32,
}

/// A bound, non-blocking SO_REUSEPORT UDP socket with large buffers (best effort).
pub(crate) fn udp_socket(addr: &SocketAddr) -> io::Result<OwnedFd> {
    let domain = if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain syscall; the result is checked and immediately owned.
    let fd = unsafe {
        sys::owned(sys::cvt(libc::socket(
            domain,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        ))?)
    };
    let raw = fd.as_raw_fd();
    sys::setsockopt_int(raw, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)?;
    sys::setsockopt_int(raw, libc::SOL_SOCKET, libc::SO_REUSEPORT, 1)?;
    // Capped by net.core.{r,w}mem_max; a smaller buffer only means earlier drops.
    let _ = sys::setsockopt_int(raw, libc::SOL_SOCKET, libc::SO_RCVBUF, 4 << 20);
    let _ = sys::setsockopt_int(raw, libc::SOL_SOCKET, libc::SO_SNDBUF, 4 << 20);
    let (st, len) = sys::sockaddr_from(addr);
    // SAFETY: `st` is a valid sockaddr of length `len`.
    sys::cvt(unsafe { libc::bind(raw, &st as *const _ as *const libc::sockaddr, len) })
        .map_err(|e| io::Error::new(e.kind(), format!("bind udp {addr}: {e}")))?;
    Ok(fd)
}

/// Attaches a classic BPF program that picks the socket of the reuseport group.
pub(crate) fn attach_reuseport_cbpf(fd: RawFd, prog: &[BpfInsn]) -> io::Result<()> {
    if prog.is_empty() || prog.len() > u16::MAX as usize {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "BPF program must have 1..=65535 instructions",
        ));
    }
    let mut filters: Vec<libc::sock_filter> = prog
        .iter()
        .map(|i| libc::sock_filter {
            code: i.code,
            jt: i.jt,
            jf: i.jf,
            k: i.k,
        })
        .collect();
    let fprog = libc::sock_fprog {
        len: filters.len() as u16,
        filter: filters.as_mut_ptr(),
    };
    // SAFETY: `fprog` points at `filters`, which outlives the call; the kernel copies the
    // program during setsockopt and keeps no pointer to our memory.
    sys::cvt(unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ATTACH_REUSEPORT_CBPF,
            &fprog as *const libc::sock_fprog as *const libc::c_void,
            mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    })
    .map(drop)
}

/// Sends one datagram without blocking. `WouldBlock` means the socket buffer is full and the
/// datagram was dropped.
pub(crate) fn send_to(fd: RawFd, to: &SocketAddr, data: &[u8]) -> io::Result<()> {
    let (st, len) = sys::sockaddr_from(to);
    loop {
        // SAFETY: `data` is a live slice of its length and `st` a valid sockaddr of `len`.
        let r = unsafe {
            libc::sendto(
                fd,
                data.as_ptr() as *const libc::c_void,
                data.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                &st as *const _ as *const libc::sockaddr,
                len,
            )
        };
        if r >= 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// The per-shard receive side: one batch buffer, reused.
pub(crate) struct UdpRx {
    buf: Vec<u8>,
    names: Vec<libc::sockaddr_storage>,
    /// (length, truncated) of each datagram of the last batch.
    lens: [(usize, bool); BATCH],
}

impl UdpRx {
    pub fn new() -> UdpRx {
        UdpRx {
            buf: vec![0u8; BATCH * DGRAM_MAX],
            // SAFETY: sockaddr_storage is plain old data; all-zero is a valid value.
            names: vec![unsafe { mem::zeroed() }; BATCH],
            lens: [(0, false); BATCH],
        }
    }

    /// One `recvmmsg` into the batch buffer; returns how many datagrams arrived.
    fn recv_batch(&mut self, fd: RawFd) -> io::Result<usize> {
        // SAFETY: iovec and mmsghdr are plain old data; all-zero is a valid value.
        let mut iovs: [libc::iovec; BATCH] = unsafe { mem::zeroed() };
        // SAFETY: as above.
        let mut hdrs: [libc::mmsghdr; BATCH] = unsafe { mem::zeroed() };
        let base = self.buf.as_mut_ptr();
        for i in 0..BATCH {
            iovs[i] = libc::iovec {
                // SAFETY: `buf` holds BATCH * DGRAM_MAX bytes, so the offset is in bounds.
                iov_base: unsafe { base.add(i * DGRAM_MAX) } as *mut libc::c_void,
                iov_len: DGRAM_MAX,
            };
            let h = &mut hdrs[i].msg_hdr;
            h.msg_name = &mut self.names[i] as *mut libc::sockaddr_storage as *mut libc::c_void;
            h.msg_namelen = mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            h.msg_iov = &mut iovs[i];
            h.msg_iovlen = 1;
        }
        // SAFETY: every header points at live, correctly sized name storage and one iovec
        // into `buf`; all of them outlive the call and nothing else aliases them meanwhile.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                hdrs.as_mut_ptr(),
                BATCH as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = n as usize;
        for (i, h) in hdrs.iter().enumerate().take(n) {
            let truncated = h.msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
            self.lens[i] = ((h.msg_len as usize).min(DGRAM_MAX), truncated);
        }
        Ok(n)
    }

    /// Receives and delivers up to [`BUDGET`] datagrams. Returns `true` when the budget ran
    /// out with the socket possibly still readable.
    pub fn drain<H: Handler>(&mut self, core: &mut Core<H::Msg>, h: &mut H) -> bool {
        let Some(fd) = core.udp.as_ref().map(|s| s.as_raw_fd()) else {
            return false;
        };
        let mut handled = 0;
        while handled < BUDGET {
            let n = match self.recv_batch(fd) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // E.g. a queued ICMP error; nothing to do but carry on later.
                    tracing::debug!(shard = core.shard, "udp receive: {e}");
                    return false;
                }
            };
            for i in 0..n {
                let (len, truncated) = self.lens[i];
                if truncated {
                    core.udp_dropped += 1;
                    continue;
                }
                let Some(from) = sys::sockaddr_to(&self.names[i]) else {
                    continue;
                };
                let data = &self.buf[i * DGRAM_MAX..i * DGRAM_MAX + len];
                h.on_datagram(&mut Ctx::new(core), from, data);
            }
            handled += n;
            if n < BATCH {
                return false;
            }
        }
        true
    }
}
