//! Waiting for descriptors: the one wrapper over poll(2) for the threads that block (the admin
//! endpoint, the pod registry's watcher, the agent SDK and `claw-agent`, the client library and
//! the terminal client). Safe code over `rustix`: the descriptors are borrowed for the call, so
//! none can be closed while it is polled.

use rustix::event::{PollFd, PollFlags, Timespec};
use std::io;
use std::os::fd::BorrowedFd;

/// Waits until one of `fds` is ready for its `events` (`libc::POLLIN`, `libc::POLLOUT`) or
/// `timeout_ms` passes (negative: no limit). Fills `revents` (one per fd, as far as it is long)
/// and returns how many are ready (0 on timeout). A signal interrupting the wait restarts it.
pub fn wait(
    fds: &[(BorrowedFd<'_>, i16)],
    revents: &mut [i16],
    timeout_ms: i32,
) -> io::Result<usize> {
    let mut pfds: Vec<PollFd<'_>> = fds
        .iter()
        .map(|(fd, events)| {
            PollFd::from_borrowed_fd(*fd, PollFlags::from_bits_truncate(*events as u16))
        })
        .collect();
    let timeout = (timeout_ms >= 0).then(|| Timespec {
        tv_sec: i64::from(timeout_ms / 1000),
        tv_nsec: i64::from(timeout_ms % 1000) * 1_000_000,
    });
    loop {
        match rustix::event::poll(&mut pfds, timeout.as_ref()) {
            Ok(n) => {
                for (r, p) in revents.iter_mut().zip(&pfds) {
                    *r = p.revents().bits() as i16;
                }
                return Ok(n);
            }
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Waits up to `timeout_ms` (negative: no limit) for `fd` to be readable; whether it is.
pub fn readable(fd: BorrowedFd<'_>, timeout_ms: i32) -> io::Result<bool> {
    let mut rev = [0i16];
    Ok(wait(&[(fd, libc::POLLIN)], &mut rev, timeout_ms)? > 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn readable_times_out_then_sees_data() {
        let (mut a, b) = UnixStream::pair().unwrap();
        let t = std::time::Instant::now();
        assert!(!readable(b.as_fd(), 30).unwrap());
        assert!(t.elapsed() >= std::time::Duration::from_millis(25));
        a.write_all(b"x").unwrap();
        assert!(readable(b.as_fd(), -1).unwrap());
    }

    #[test]
    fn wait_reports_each_descriptor() {
        let (mut a, b) = UnixStream::pair().unwrap();
        let (c, _d) = UnixStream::pair().unwrap();
        a.write_all(b"x").unwrap();
        let mut rev = [0i16; 3];
        let n = wait(
            &[
                (b.as_fd(), libc::POLLIN),
                (c.as_fd(), libc::POLLIN),
                (c.as_fd(), libc::POLLOUT),
            ],
            &mut rev,
            1000,
        )
        .unwrap();
        assert_eq!(n, 2);
        assert_ne!(rev[0] & libc::POLLIN, 0);
        assert_eq!(rev[1], 0);
        assert_ne!(rev[2] & libc::POLLOUT, 0);
    }
}
