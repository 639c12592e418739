//! Thin libc helpers: file limits, /proc readings, nonblocking sockets, epoll with a
//! nanosecond timeout.

use std::fs;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;

pub fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

pub fn errno_str() -> String {
    std::io::Error::last_os_error().to_string()
}

/// Raises the soft RLIMIT_NOFILE to the hard limit; returns the soft limit now in force.
pub fn raise_nofile() -> u64 {
    // SAFETY: getrlimit/setrlimit with a valid pointer to a plain struct.
    unsafe {
        let mut r: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) != 0 {
            return 0;
        }
        if r.rlim_cur < r.rlim_max {
            let want = libc::rlimit {
                rlim_cur: r.rlim_max,
                rlim_max: r.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                return r.rlim_max as u64;
            }
        }
        r.rlim_cur as u64
    }
}

/// VmRSS of `pid` in bytes.
pub fn vm_rss(pid: u32) -> Option<u64> {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// utime + stime of `pid` (all threads), in seconds.
pub fn proc_cpu_s(pid: u32) -> Option<f64> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Some(ticks as f64 / hz)
}

/// The per-CPU time counters of `/proc/stat` (clock ticks): for each `cpuN` line, N and
/// user, nice, system, idle, iowait, irq, softirq, steal.
pub fn cpu_ticks() -> Vec<(usize, [u64; 8])> {
    let Ok(s) = fs::read_to_string("/proc/stat") else {
        return Vec::new();
    };
    parse_cpu_ticks(&s)
}

pub fn parse_cpu_ticks(stat: &str) -> Vec<(usize, [u64; 8])> {
    let mut out = Vec::new();
    for line in stat.lines() {
        let mut f = line.split_whitespace();
        let Some(cpu) = f.next().and_then(|n| n.strip_prefix("cpu")) else {
            continue;
        };
        let Ok(n) = cpu.parse::<usize>() else {
            continue; // the "cpu" total line
        };
        let mut t = [0u64; 8];
        for v in t.iter_mut() {
            *v = f.next().and_then(|x| x.parse().ok()).unwrap_or(0);
        }
        out.push((n, t));
    }
    out
}

/// How each CPU spent the time between two `cpu_ticks` samples, as fractions: `busy` is
/// everything but idle, iowait and steal (user, nice, system, irq and softirq: on loopback the
/// softirq time is the kernel's TCP receive work done on the sending CPU).
pub fn cpu_usage(a: &[(usize, [u64; 8])], b: &[(usize, [u64; 8])]) -> serde_json::Value {
    let mut out = Vec::new();
    for (n, t1) in b {
        let Some((_, t0)) = a.iter().find(|(m, _)| m == n) else {
            continue;
        };
        let d: Vec<u64> = t1
            .iter()
            .zip(t0)
            .map(|(x, y)| x.saturating_sub(*y))
            .collect();
        let total: u64 = d.iter().sum();
        if total == 0 {
            continue;
        }
        let f = |x: u64| (x as f64 / total as f64 * 1000.0).round() / 1000.0;
        let busy = d[0] + d[1] + d[2] + d[5] + d[6];
        out.push(serde_json::json!({
            "cpu": n, "busy": f(busy), "user": f(d[0] + d[1]), "system": f(d[2]),
            "irq": f(d[5]), "softirq": f(d[6]), "idle": f(d[3] + d[4]), "steal": f(d[7]),
        }));
    }
    serde_json::Value::Array(out)
}

/// CPU seconds used by this process so far.
pub fn self_cpu_s() -> f64 {
    // SAFETY: getrusage writes into a plain struct.
    unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut ru);
        let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        tv(ru.ru_utime) + tv(ru.ru_stime)
    }
}

pub fn sockaddr(a: SocketAddrV4) -> libc::sockaddr_in {
    // SAFETY: sockaddr_in is plain data.
    let mut s: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    s.sin_family = libc::AF_INET as libc::sa_family_t;
    s.sin_port = a.port().to_be();
    s.sin_addr.s_addr = u32::from(*a.ip()).to_be();
    s
}

const SALEN: libc::socklen_t = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;

fn setopt(fd: i32, level: i32, name: i32, v: libc::c_int) -> bool {
    // SAFETY: valid pointer to a c_int of the given size.
    unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            &v as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        ) == 0
    }
}

/// Where a client socket's source address comes from.
#[derive(Copy, Clone, Debug)]
pub enum Src {
    /// This source IP, kernel-chosen port at connect time (IP_BIND_ADDRESS_NO_PORT).
    Ip(Ipv4Addr),
    /// Exactly this address and port (SO_REUSEADDR), e.g. to reuse an old 4-tuple.
    Exact(SocketAddrV4),
}

/// A nonblocking TCP socket bound to `src` with a connect to `dst` started.
/// Returns `(fd, connected_already, got_the_exact_source)`; for [`Src::Exact`], an address
/// already in use falls back to a fresh port on the same IP (third field `false`).
pub fn start_connect(src: Src, dst: SocketAddrV4) -> Result<(i32, bool, bool), String> {
    // SAFETY: plain socket syscalls on a fresh fd with valid, sized arguments.
    unsafe {
        let fd = libc::socket(
            libc::AF_INET,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        );
        if fd < 0 {
            return Err(format!("socket(): {}", errno_str()));
        }
        setopt(fd, libc::IPPROTO_TCP, libc::TCP_NODELAY, 1);
        // SO_REUSEADDR on every client socket: an exact re-bind to an old 4-tuple (resume with
        // the same source port) must not be refused because of this tool's own sockets, e.g.
        // ones in TIME_WAIT towards another server port that share the port number.
        setopt(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1);
        let sa = match src {
            Src::Ip(ip) => {
                setopt(fd, libc::IPPROTO_IP, libc::IP_BIND_ADDRESS_NO_PORT, 1);
                sockaddr(SocketAddrV4::new(ip, 0))
            }
            Src::Exact(a) => sockaddr(a),
        };
        if libc::bind(fd, &sa as *const _ as *const libc::sockaddr, SALEN) != 0 {
            let e = errno_str();
            let code = errno();
            libc::close(fd);
            if let (Src::Exact(a), libc::EADDRINUSE) = (src, code) {
                // The old port is taken by another socket: fall back to a fresh port.
                return start_connect(Src::Ip(*a.ip()), dst).map(|(fd, now, _)| (fd, now, false));
            }
            return Err(format!("bind {src:?}: {e}"));
        }
        let da = sockaddr(dst);
        let r = libc::connect(fd, &da as *const _ as *const libc::sockaddr, SALEN);
        if r != 0 && errno() != libc::EINPROGRESS {
            let e = errno_str();
            libc::close(fd);
            return Err(format!("connect: {e}"));
        }
        Ok((fd, r == 0, true))
    }
}

/// The pending error of a socket whose nonblocking connect finished (0 = connected).
pub fn so_error(fd: i32) -> i32 {
    let mut err: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: valid out-pointers of the right size.
    unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ERROR,
            &mut err as *mut _ as *mut libc::c_void,
            &mut len,
        )
    };
    err
}

/// The local address of a connected socket.
pub fn local_addr(fd: i32) -> Option<SocketAddrV4> {
    // SAFETY: sockaddr_in is plain data; getsockname writes at most `len` bytes.
    unsafe {
        let mut sa: libc::sockaddr_in = std::mem::zeroed();
        let mut len = SALEN;
        if libc::getsockname(fd, &mut sa as *mut _ as *mut libc::sockaddr, &mut len) != 0 {
            return None;
        }
        Some(SocketAddrV4::new(
            Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr)),
            u16::from_be(sa.sin_port),
        ))
    }
}

/// Closes with SO_LINGER 0: the peer gets an RST, no TIME_WAIT here.
pub fn close_abort(fd: i32) {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: valid pointer and size; our own fd, closed once by the caller's contract.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &l as *const libc::linger as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
        libc::close(fd);
    }
}

pub fn close(fd: i32) {
    // SAFETY: our own fd, closed once by the caller's contract.
    unsafe { libc::close(fd) };
}

pub fn set_nonblocking(fd: i32) {
    // SAFETY: fcntl on our own fd.
    unsafe {
        let fl = libc::fcntl(fd, libc::F_GETFL);
        libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK);
    }
}

/// An epoll instance.
pub struct Epoll {
    pub fd: i32,
}

impl Epoll {
    pub fn new() -> Result<Epoll, String> {
        // SAFETY: plain syscall.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(format!("epoll_create1: {}", errno_str()));
        }
        Ok(Epoll { fd })
    }

    pub fn ctl(&self, op: i32, fd: i32, token: u64, events: u32) -> bool {
        let mut ev = libc::epoll_event { events, u64: token };
        // SAFETY: valid epoll fd and event struct.
        unsafe { libc::epoll_ctl(self.fd, op, fd, &mut ev) == 0 }
    }

    /// epoll_pwait2 (nanosecond timeout); falls back to epoll_wait with a millisecond one.
    pub fn wait(&self, evs: &mut [libc::epoll_event], timeout: Duration) -> usize {
        let ts = libc::timespec {
            tv_sec: timeout.as_secs() as libc::time_t,
            tv_nsec: timeout.subsec_nanos() as libc::c_long,
        };
        // SAFETY: valid buffer of `evs.len()` events, valid timespec, no sigmask.
        let n = unsafe {
            libc::syscall(
                libc::SYS_epoll_pwait2,
                self.fd,
                evs.as_mut_ptr(),
                evs.len() as libc::c_int,
                &ts as *const libc::timespec,
                std::ptr::null::<libc::sigset_t>(),
                0usize,
            )
        };
        if n >= 0 {
            return n as usize;
        }
        if errno() == libc::ENOSYS {
            let ms = timeout.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32;
            // SAFETY: as above.
            let n = unsafe { libc::epoll_wait(self.fd, evs.as_mut_ptr(), evs.len() as i32, ms) };
            return n.max(0) as usize;
        }
        0
    }
}

impl Drop for Epoll {
    fn drop(&mut self) {
        close(self.fd);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STAT0: &str = "cpu  10 0 10 100 0 0 0 0 0 0\n\
cpu0 100 0 50 1000 0 0 20 0 0 0\n\
cpu1 10 0 10 2000 5 0 0 1 0 0\n\
intr 12345\n";
    const STAT1: &str = "cpu  10 0 10 100 0 0 0 0 0 0\n\
cpu0 150 0 70 1000 0 0 50 0 0 0\n\
cpu1 20 0 10 2085 5 0 0 6 0 0\n";

    #[test]
    fn parses_the_per_cpu_lines_only() {
        let t = parse_cpu_ticks(STAT0);
        assert_eq!(t.len(), 2);
        assert_eq!(t[0], (0, [100, 0, 50, 1000, 0, 0, 20, 0]));
        assert_eq!(t[1].0, 1);
    }

    #[test]
    fn usage_splits_the_window_per_cpu() {
        let u = cpu_usage(&parse_cpu_ticks(STAT0), &parse_cpu_ticks(STAT1));
        // cpu0: 50 user + 20 system + 30 softirq, never idle.
        assert_eq!(u[0]["busy"], 1.0);
        assert_eq!(u[0]["softirq"], 0.3);
        // cpu1: 10 user, 85 idle, 5 steal of 100.
        assert_eq!(u[1]["busy"], 0.1);
        assert_eq!(u[1]["idle"], 0.85);
        assert_eq!(u[1]["steal"], 0.05);
    }
}
