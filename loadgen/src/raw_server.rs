//! `loadgen raw-echo-server`: the baseline. A single-threaded epoll TCP echo server with no
//! protocol at all (bytes in, same bytes out), so that `raw-echo` against it measures what the
//! kernel, loopback and the client cost on their own. Prints `raw-echo-server listening on
//! ADDR` on stdout, then serves until killed (or `--duration` seconds, default 1 h).

use crate::sys::{self, Epoll};
use crate::Opts;
use std::io::Write;
use std::net::TcpListener;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

const LISTENER: u64 = u64::MAX;

struct RawConn {
    fd: i32,
    pending: Vec<u8>,
}

pub fn run(o: &Opts) -> i32 {
    sys::raise_nofile();
    let l = match TcpListener::bind(&o.bind) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("raw-echo-server: bind {}: {e}", o.bind);
            return 1;
        }
    };
    let _ = l.set_nonblocking(true);
    let lfd = l.as_raw_fd();
    // SAFETY: re-listen on our own listening socket to raise the backlog.
    unsafe { libc::listen(lfd, 4096) };
    let addr = l.local_addr().map(|a| a.to_string()).unwrap_or_default();
    println!("raw-echo-server listening on {addr}");
    let _ = std::io::stdout().flush();
    let ep = match Epoll::new() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("raw-echo-server: {e}");
            return 1;
        }
    };
    ep.ctl(libc::EPOLL_CTL_ADD, lfd, LISTENER, libc::EPOLLIN as u32);
    let mut conns: Vec<Option<RawConn>> = Vec::new();
    let mut free: Vec<usize> = Vec::new();
    let mut evs = vec![libc::epoll_event { events: 0, u64: 0 }; 1024];
    let mut buf = vec![0u8; 64 * 1024];
    let life = if o.duration == 10.0 {
        Duration::from_secs(3600)
    } else {
        Duration::from_secs_f64(o.duration)
    };
    let t = Instant::now();
    while t.elapsed() < life {
        let n = ep.wait(&mut evs, Duration::from_millis(500));
        for ev in evs.iter().take(n) {
            if ev.u64 == LISTENER {
                loop {
                    // SAFETY: accept4 on our listener; null address out-pointers are allowed.
                    let fd = unsafe {
                        libc::accept4(
                            lfd,
                            std::ptr::null_mut(),
                            std::ptr::null_mut(),
                            libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                        )
                    };
                    if fd < 0 {
                        break;
                    }
                    let one: libc::c_int = 1;
                    // SAFETY: valid pointer and size.
                    unsafe {
                        libc::setsockopt(
                            fd,
                            libc::IPPROTO_TCP,
                            libc::TCP_NODELAY,
                            &one as *const libc::c_int as *const libc::c_void,
                            4,
                        )
                    };
                    let i = free.pop().unwrap_or_else(|| {
                        conns.push(None);
                        conns.len() - 1
                    });
                    conns[i] = Some(RawConn {
                        fd,
                        pending: Vec::new(),
                    });
                    ep.ctl(libc::EPOLL_CTL_ADD, fd, i as u64, libc::EPOLLIN as u32);
                }
                continue;
            }
            let i = ev.u64 as usize;
            let Some(c) = conns[i].as_mut() else { continue };
            let mut close = false;
            if !c.pending.is_empty() {
                // SAFETY: write from our own buffer to our own fd.
                let w = unsafe {
                    libc::write(
                        c.fd,
                        c.pending.as_ptr() as *const libc::c_void,
                        c.pending.len(),
                    )
                };
                if w < 0 && sys::errno() != libc::EAGAIN {
                    close = true;
                } else if w > 0 {
                    c.pending.drain(..w as usize);
                }
                if c.pending.is_empty() {
                    ep.ctl(libc::EPOLL_CTL_MOD, c.fd, i as u64, libc::EPOLLIN as u32);
                }
            } else {
                // SAFETY: read into our own buffer.
                let r =
                    unsafe { libc::read(c.fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len()) };
                if r == 0 || (r < 0 && sys::errno() != libc::EAGAIN) {
                    close = true;
                } else if r > 0 {
                    let r = r as usize;
                    // SAFETY: as above.
                    let w = unsafe { libc::write(c.fd, buf.as_ptr() as *const libc::c_void, r) };
                    let w = if w < 0 {
                        if sys::errno() != libc::EAGAIN {
                            close = true;
                        }
                        0
                    } else {
                        w as usize
                    };
                    if w < r && !close {
                        c.pending.extend_from_slice(&buf[w..r]);
                        ep.ctl(libc::EPOLL_CTL_MOD, c.fd, i as u64, libc::EPOLLOUT as u32);
                    }
                }
            }
            if close {
                sys::close(c.fd);
                conns[i] = None;
                free.push(i);
            }
        }
    }
    0
}
