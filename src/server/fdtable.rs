//! Growing the process's descriptor table up front.
//!
//! The kernel grows a process's descriptor table by doubling it, and when the process has
//! more than one thread each doubling waits for an RCU grace period (`expand_fdtable`'s
//! `synchronize_rcu`): milliseconds each. A daemon that takes in thousands of descriptors at
//! once with its shard threads running (a live upgrade receiving every connection, a restart
//! whose clients all reconnect) would pay that a dozen times on the hot path. Grown once,
//! while the process still has a single thread or before the rush, the table never shrinks.

use std::os::fd::AsFd;

/// Grows the descriptor table to hold `n` descriptors (capped by the soft `RLIMIT_NOFILE`),
/// using `fd` to make a copy at the top and closing it at once. Returns the size reserved
/// (0: nothing to do or not possible; the table then grows as usual, only slower).
pub fn reserve(fd: impl AsFd, n: usize) -> usize {
    let soft = rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .current
        .unwrap_or(u64::MAX);
    let top = (n as u64).min(soft.saturating_sub(1));
    if top < 256 {
        return 0;
    }
    match rustix::io::fcntl_dupfd_cloexec(fd, top as i32) {
        // Dropped here: closed, the table stays as large.
        Ok(copy) => {
            drop(copy);
            top as usize + 1
        }
        Err(e) => {
            tracing::debug!("could not grow the descriptor table to {top}: {e}");
            0
        }
    }
}

/// The size of this process's descriptor table (`FDSize` in /proc/self/status): the hint a
/// live upgrade gives the process taking over. One small read, where listing /proc/self/fd
/// would cost a lookup per descriptor. `None` when /proc is not readable.
pub fn table_size() -> Option<usize> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("FDSize:"))
        .and_then(|v| v.trim().parse().ok())
}

/// The number of descriptors this process has open (tests).
#[cfg(test)]
fn open_count() -> Option<usize> {
    std::fs::read_dir("/proc/self/fd").ok().map(|d| d.count())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserving_leaves_no_descriptor_open_and_the_next_fd_is_low() {
        let before = open_count().unwrap();
        let f = std::fs::File::open("/dev/null").unwrap();
        let got = reserve(&f, 4096);
        assert!(got == 0 || got >= 4096, "reserved {got}");
        drop(f);
        assert_eq!(open_count().unwrap(), before);
        // The lowest free descriptor is still handed out first.
        let g = std::fs::File::open("/dev/null").unwrap();
        assert!(std::os::fd::AsRawFd::as_raw_fd(&g) < 256);
        // Tiny requests do nothing.
        assert_eq!(reserve(&g, 10), 0);
        // The table holds what was reserved.
        if got > 0 {
            assert!(table_size().unwrap() >= got, "{:?} < {got}", table_size());
        }
    }
}
