//! Thin libc wrappers (sockets, eventfd, affinity). Every FFI call is an `unsafe` block with
//! its justification; callers only deal in `io::Result`.

use std::io;
use std::mem;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

pub(crate) fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn cvt_size(r: libc::ssize_t) -> io::Result<usize> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

/// Take ownership of a freshly returned fd.
///
/// # Safety
/// `fd` must be a valid, open fd that nobody else owns.
pub(crate) unsafe fn owned(fd: RawFd) -> OwnedFd {
    // SAFETY: forwarded to the caller's contract.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// `shutdown(fd, SHUT_WR)`; errors (e.g. the peer already reset) are irrelevant here.
pub(crate) fn shutdown_write(fd: RawFd) {
    // SAFETY: plain syscall on an fd the caller owns; no memory is passed.
    unsafe {
        libc::shutdown(fd, libc::SHUT_WR);
    }
}

pub(crate) fn close(fd: RawFd) {
    // SAFETY: callers pass an fd they own and never use again after this call.
    unsafe {
        libc::close(fd);
    }
}

pub(crate) fn sockaddr_from(addr: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain old data; all-zero is a valid value.
    let mut st: libc::sockaddr_storage = unsafe { mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and at least as aligned as sockaddr_in.
            unsafe { std::ptr::write(&mut st as *mut _ as *mut libc::sockaddr_in, sin) };
            mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: sockaddr_storage is larger than and at least as aligned as sockaddr_in6.
            unsafe { std::ptr::write(&mut st as *mut _ as *mut libc::sockaddr_in6, sin6) };
            mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (st, len as libc::socklen_t)
}

pub(crate) fn sockaddr_to(st: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match st.ss_family as libc::c_int {
        libc::AF_INET => {
            // SAFETY: ss_family says the storage holds a sockaddr_in; storage is big and
            // aligned enough.
            let sin = unsafe { &*(st as *const _ as *const libc::sockaddr_in) };
            Some(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes()),
                u16::from_be(sin.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: as above, for sockaddr_in6.
            let sin6 = unsafe { &*(st as *const _ as *const libc::sockaddr_in6) };
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(sin6.sin6_addr.s6_addr),
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

pub(crate) fn setsockopt_int(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    val: libc::c_int,
) -> io::Result<()> {
    // SAFETY: passes a pointer to a live c_int and its exact size.
    cvt(unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            &val as *const libc::c_int as *const libc::c_void,
            mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    })
    .map(drop)
}

/// A bound, listening SO_REUSEPORT TCP socket.
pub(crate) fn tcp_listener(
    addr: &SocketAddr,
    backlog: i32,
    nonblocking: bool,
) -> io::Result<OwnedFd> {
    let domain = if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    let mut ty = libc::SOCK_STREAM | libc::SOCK_CLOEXEC;
    if nonblocking {
        ty |= libc::SOCK_NONBLOCK;
    }
    // SAFETY: plain syscall; the result is checked and immediately owned.
    let fd = unsafe { owned(cvt(libc::socket(domain, ty, 0))?) };
    let raw = fd.as_raw_fd();
    setsockopt_int(raw, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)?;
    setsockopt_int(raw, libc::SOL_SOCKET, libc::SO_REUSEPORT, 1)?;
    let (st, len) = sockaddr_from(addr);
    // SAFETY: `st` is a valid sockaddr of length `len`.
    cvt(unsafe { libc::bind(raw, &st as *const _ as *const libc::sockaddr, len) })
        .map_err(|e| io::Error::new(e.kind(), format!("bind {addr}: {e}")))?;
    // SAFETY: plain syscall on an fd we own.
    cvt(unsafe { libc::listen(raw, backlog) })?;
    Ok(fd)
}

pub(crate) fn local_addr(fd: RawFd) -> io::Result<SocketAddr> {
    // SAFETY: zeroed storage is valid; getsockname writes at most `len` bytes into it.
    let mut st: libc::sockaddr_storage = unsafe { mem::zeroed() };
    let mut len = mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: see above.
    cvt(unsafe { libc::getsockname(fd, &mut st as *mut _ as *mut libc::sockaddr, &mut len) })?;
    sockaddr_to(&st).ok_or_else(|| io::Error::other("not an IP socket"))
}

/// `getpeername`; `None` for non-IP (AF_UNIX) sockets or errors.
pub(crate) fn peer_addr(fd: RawFd) -> Option<SocketAddr> {
    // SAFETY: zeroed storage is valid; getpeername writes at most `len` bytes into it.
    let mut st: libc::sockaddr_storage = unsafe { mem::zeroed() };
    let mut len = mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: see above.
    let r = unsafe { libc::getpeername(fd, &mut st as *mut _ as *mut libc::sockaddr, &mut len) };
    if r < 0 {
        return None;
    }
    sockaddr_to(&st)
}

/// Bytes the kernel still holds for a connected stream socket's peer: not yet sent plus sent but
/// not yet acknowledged by the peer's TCP (`SIOCOUTQ`). `None` when the socket does not support
/// it (e.g. a socket that is not connected, or an error).
pub(crate) fn outq(fd: RawFd) -> Option<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: SIOCOUTQ (= TIOCOUTQ) writes one `int` through the pointer, which points at a
    // live local of that type; no other memory is touched.
    let r = unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut n as *mut libc::c_int) };
    (r == 0 && n >= 0).then_some(n as usize)
}

pub(crate) fn unspecified_addr() -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0))
}

pub(crate) fn set_nodelay(fd: RawFd) {
    let _ = setsockopt_int(fd, libc::IPPROTO_TCP, libc::TCP_NODELAY, 1);
}

pub(crate) fn set_nonblocking(fd: RawFd, on: bool) -> io::Result<()> {
    // SAFETY: fcntl on an fd we own; no pointers involved.
    let flags = cvt(unsafe { libc::fcntl(fd, libc::F_GETFL) })?;
    let new = if on {
        flags | libc::O_NONBLOCK
    } else {
        flags & !libc::O_NONBLOCK
    };
    if new != flags {
        // SAFETY: as above.
        cvt(unsafe { libc::fcntl(fd, libc::F_SETFL, new) })?;
    }
    Ok(())
}

/// `accept4` on a non-blocking listener: new non-blocking fd + peer address.
pub(crate) fn accept(fd: RawFd) -> io::Result<(OwnedFd, SocketAddr)> {
    // SAFETY: zeroed storage is valid; accept4 writes at most `len` bytes into it.
    let mut st: libc::sockaddr_storage = unsafe { mem::zeroed() };
    let mut len = mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: see above; the returned fd is checked and immediately owned.
    let nfd = cvt(unsafe {
        libc::accept4(
            fd,
            &mut st as *mut _ as *mut libc::sockaddr,
            &mut len,
            libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
        )
    })?;
    // SAFETY: accept4 returned a new fd that nobody else owns.
    let nfd = unsafe { owned(nfd) };
    Ok((nfd, sockaddr_to(&st).unwrap_or_else(unspecified_addr)))
}

pub(crate) fn eventfd(nonblocking: bool) -> io::Result<OwnedFd> {
    let mut flags = libc::EFD_CLOEXEC;
    if nonblocking {
        flags |= libc::EFD_NONBLOCK;
    }
    // SAFETY: plain syscall; the result is checked and immediately owned.
    Ok(unsafe { owned(cvt(libc::eventfd(0, flags))?) })
}

pub(crate) fn eventfd_write(fd: RawFd) {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a live u64.
    unsafe {
        libc::write(fd, &one as *const u64 as *const libc::c_void, 8);
    }
}

/// Drain a non-blocking eventfd.
pub(crate) fn eventfd_read(fd: RawFd) {
    let mut v: u64 = 0;
    // SAFETY: reads at most 8 bytes into a live u64.
    unsafe {
        libc::read(fd, &mut v as *mut u64 as *mut libc::c_void, 8);
    }
}

/// A non-blocking, close-on-exec AF_UNIX stream socket.
pub(crate) fn unix_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain syscall; the result is checked and immediately owned.
    Ok(unsafe {
        owned(cvt(libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        ))?)
    })
}

pub(crate) fn unix_sockaddr(path: &Path) -> io::Result<(libc::sockaddr_un, libc::socklen_t)> {
    // SAFETY: sockaddr_un is plain old data; all-zero is valid.
    let mut sun: libc::sockaddr_un = unsafe { mem::zeroed() };
    sun.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    if bytes.is_empty() || bytes.len() >= sun.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("invalid unix socket path {}", path.display()),
        ));
    }
    for (d, s) in sun.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    let len = mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    Ok((sun, len as libc::socklen_t))
}

pub(crate) fn connect_unix(
    fd: RawFd,
    sun: &libc::sockaddr_un,
    len: libc::socklen_t,
) -> io::Result<()> {
    // SAFETY: `sun` is a valid sockaddr_un of length `len`.
    cvt(unsafe { libc::connect(fd, sun as *const _ as *const libc::sockaddr, len) }).map(drop)
}

pub(crate) fn recv(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: the kernel writes at most buf.len() bytes into the live, exclusive buffer.
    cvt_size(unsafe { libc::recv(fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len(), 0) })
}

pub(crate) fn send(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: the kernel reads at most buf.len() bytes from the live buffer.
    cvt_size(unsafe {
        libc::send(
            fd,
            buf.as_ptr() as *const libc::c_void,
            buf.len(),
            libc::MSG_NOSIGNAL,
        )
    })
}

/// Pending socket error (SO_ERROR).
pub(crate) fn take_error(fd: RawFd) -> Option<io::Error> {
    let mut v: libc::c_int = 0;
    let mut len = mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into a live c_int.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ERROR,
            &mut v as *mut libc::c_int as *mut libc::c_void,
            &mut len,
        )
    };
    if r == 0 && v != 0 {
        Some(io::Error::from_raw_os_error(v))
    } else {
        None
    }
}

pub(crate) fn allowed_cpus() -> io::Result<Vec<usize>> {
    // SAFETY: cpu_set_t is plain old data; all-zero is the empty set.
    let mut set: libc::cpu_set_t = unsafe { mem::zeroed() };
    // SAFETY: passes the exact size of a live cpu_set_t.
    cvt(unsafe { libc::sched_getaffinity(0, mem::size_of::<libc::cpu_set_t>(), &mut set) })?;
    let mut out = Vec::new();
    for cpu in 0..libc::CPU_SETSIZE as usize {
        // SAFETY: cpu < CPU_SETSIZE, so the bit index is in range.
        if unsafe { libc::CPU_ISSET(cpu, &set) } {
            out.push(cpu);
        }
    }
    Ok(out)
}

/// Restricts the calling thread to `cpus` (threads it spawns afterwards inherit the mask).
pub(crate) fn set_affinity(cpus: &[usize]) -> io::Result<()> {
    // SAFETY: cpu_set_t is plain old data; all-zero is the empty set.
    let mut set: libc::cpu_set_t = unsafe { mem::zeroed() };
    for &cpu in cpus {
        if cpu >= libc::CPU_SETSIZE as usize {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("CPU {cpu} is beyond CPU_SETSIZE"),
            ));
        }
        // SAFETY: cpu < CPU_SETSIZE (checked above), so the bit index is in range.
        unsafe { libc::CPU_SET(cpu, &mut set) };
    }
    // SAFETY: passes the exact size of a live, initialised cpu_set_t.
    cvt(unsafe { libc::sched_setaffinity(0, mem::size_of::<libc::cpu_set_t>(), &set) })?;
    Ok(())
}

/// Anonymous private page-aligned mapping of `len` bytes.
pub(crate) fn mmap_anon(len: usize) -> io::Result<*mut u8> {
    // SAFETY: anonymous mapping request; no existing memory is affected.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        Err(io::Error::last_os_error())
    } else {
        Ok(p as *mut u8)
    }
}

/// # Safety
/// `p`/`len` must describe a mapping from [`mmap_anon`] that nothing references any more.
pub(crate) unsafe fn munmap(p: *mut u8, len: usize) {
    // SAFETY: forwarded to the caller's contract.
    unsafe {
        libc::munmap(p as *mut libc::c_void, len);
    }
}

/// A connected AF_UNIX stream socket pair (blocking, close-on-exec).
pub(crate) fn socketpair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    sys_socketpair(&mut fds)?;
    // SAFETY: both fds were just created and are owned by nobody else.
    Ok(unsafe { (owned(fds[0]), owned(fds[1])) })
}

fn sys_socketpair(fds: &mut [RawFd; 2]) -> io::Result<()> {
    // SAFETY: socketpair writes exactly two fds into the live 2-element array.
    cvt(unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    })
    .map(drop)
}
