//! Pseudo-terminals for agents that run programs in a terminal (`claw-agent shell`), and the
//! process-session helpers that go with them.
//!
//! [`spawn`] starts a [`Command`] as the leader of a new session whose controlling terminal is
//! the slave side of a fresh PTY, and returns the master side ([`PtyMaster`]) and the
//! [`Child`]. The session id (and process group id) of everything the program starts in that
//! terminal is the child's pid, which [`signal_session`] and [`session_members`] use to reach
//! background jobs too (they live in process groups of their own under job control).
//!
//! Every descriptor made here is close-on-exec, so no other program spawned by the agent
//! inherits a terminal it doesn't own.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};

/// The master side of a PTY. Reading it gives what the program wrote to its terminal; writing
/// it is typing. Once every process has closed the slave side, reads fail with `EIO` (Linux)
/// or return 0.
#[derive(Debug)]
pub struct PtyMaster {
    file: File,
}

impl PtyMaster {
    /// Sets the terminal's window size; the foreground process group gets `SIGWINCH`.
    pub fn resize(&self, cols: u16, rows: u16) -> io::Result<()> {
        set_winsize(self.file.as_fd(), cols, rows)
    }

    /// Switches the master to non-blocking mode (reads and writes fail with `WouldBlock`
    /// instead of waiting); use [`clawterm_poll::wait`] to wait.
    pub fn set_nonblocking(&self) -> io::Result<()> {
        let fd = self.file.as_raw_fd();
        // SAFETY: fcntl on a descriptor we own; no pointers involved.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        if flags < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: as above.
        if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// The master as a `File` (`&File` implements `Read` and `Write`, so threads can share it).
    pub fn file(&self) -> &File {
        &self.file
    }
}

impl AsFd for PtyMaster {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

impl AsRawFd for PtyMaster {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

/// Sets the window size of the terminal behind `fd` (`TIOCSWINSZ`).
pub fn set_winsize(fd: BorrowedFd<'_>, cols: u16, rows: u16) -> io::Result<()> {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one `winsize` from the pointer, which is valid for the call.
    if unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            libc::TIOCSWINSZ,
            &ws as *const libc::winsize,
        )
    } < 0
    {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Opens a new PTY pair (master, slave), both close-on-exec, the slave not becoming anyone's
/// controlling terminal by being opened.
#[cfg(any(target_os = "linux", target_os = "android"))]
fn open_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    // SAFETY: posix_openpt takes flags only and returns a new descriptor or -1.
    let m = unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) };
    if m < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `m` is a fresh descriptor that nothing else owns.
    let master = unsafe { OwnedFd::from_raw_fd(m) };
    // SAFETY: grantpt/unlockpt on the master we just opened; no pointers involved.
    if unsafe { libc::grantpt(m) } != 0 || unsafe { libc::unlockpt(m) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut name = [0 as libc::c_char; 128];
    // SAFETY: ptsname_r writes a NUL-terminated name of at most `name.len()` bytes into `name`.
    let rc = unsafe { libc::ptsname_r(m, name.as_mut_ptr(), name.len()) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    // SAFETY: `name` is NUL-terminated (ptsname_r succeeded); open returns a new fd or -1.
    let s = unsafe {
        libc::open(
            name.as_ptr(),
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        )
    };
    if s < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `s` is a fresh descriptor that nothing else owns.
    let slave = unsafe { OwnedFd::from_raw_fd(s) };
    Ok((master, slave))
}

/// Opens a new PTY pair (master, slave), both close-on-exec. (Where `posix_openpt` with
/// `O_CLOEXEC` isn't available, a program forked by another thread at the same moment could
/// inherit the pair; it has no use for it and it closes when that program execs or exits.)
#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn open_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let (mut m, mut s): (libc::c_int, libc::c_int) = (-1, -1);
    // SAFETY: openpty writes two descriptors into `m` and `s`; the name, termios and winsize
    // pointers may be null.
    let rc = unsafe {
        libc::openpty(
            &mut m,
            &mut s,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both are fresh descriptors that nothing else owns.
    let (master, slave) = unsafe { (OwnedFd::from_raw_fd(m), OwnedFd::from_raw_fd(s)) };
    for fd in [m, s] {
        // SAFETY: fcntl on descriptors we own; no pointers involved.
        if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok((master, slave))
}

/// Starts `cmd` in a new PTY of `cols` x `rows`: the slave is its stdin, stdout and stderr,
/// and, in a new session (`setsid`), its controlling terminal (`TIOCSCTTY`). The child's pid is
/// therefore its session id and process group id.
///
/// `cmd`'s stdio settings are replaced; `cmd` is consumed so that no copy of the slave stays
/// open in this process (the master then sees EOF/`EIO` when the program and its children are
/// gone). Don't also ask `cmd` for a process group (`process_group`): a group leader can't
/// start a session.
pub fn spawn(mut cmd: Command, cols: u16, rows: u16) -> io::Result<(PtyMaster, Child)> {
    let (master, slave) = open_pair()?;
    set_winsize(master.as_fd(), cols, rows)?;
    let stdin = slave.try_clone()?;
    let stdout = slave.try_clone()?;
    cmd.stdin(Stdio::from(stdin))
        .stdout(Stdio::from(stdout))
        .stderr(Stdio::from(slave));
    // SAFETY: the hook runs in the child between fork and exec and only makes two
    // async-signal-safe syscalls (setsid, ioctl); it touches no memory of the parent. By then
    // std has already made the slave the child's fd 0.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            if libc::ioctl(0, libc::TIOCSCTTY as _, 0) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn()?;
    drop(cmd); // closes our copies of the slave
    Ok((
        PtyMaster {
            file: File::from(master),
        },
        child,
    ))
}

/// The live (not zombie) processes of session `sid`, as pids. Linux only (reads `/proc`);
/// elsewhere an empty list.
pub fn session_members(sid: libc::pid_t) -> Vec<libc::pid_t> {
    let mut pids = Vec::new();
    if !cfg!(any(target_os = "linux", target_os = "android")) {
        return pids;
    }
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return pids;
    };
    for entry in dir.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.parse::<libc::pid_t>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // "pid (comm) state ppid pgrp session ..."; comm may hold spaces and parentheses.
        let Some((_, rest)) = stat.rsplit_once(") ") else {
            continue;
        };
        let mut f = rest.split_ascii_whitespace();
        let state = f.next().unwrap_or("Z");
        let session = f.nth(2).and_then(|x| x.parse::<libc::pid_t>().ok());
        if session == Some(sid) && state != "Z" && state != "X" {
            pids.push(pid);
        }
    }
    pids
}

/// Sends `sig` to every live process of session `sid`: its leader's process group, and (on
/// Linux) each member found in `/proc`, so background jobs in process groups of their own
/// are reached too. Set `leader_alive` only while the leader `sid` has not been reaped yet
/// (so the id can't have been reused). Errors (`ESRCH`: already gone) are ignored.
pub fn signal_session(sid: libc::pid_t, sig: libc::c_int, leader_alive: bool) {
    if sid <= 0 {
        return;
    }
    if leader_alive {
        // SAFETY: plain syscall; `sid` is the pid of our unreaped child, hence its group id.
        unsafe { libc::killpg(sid, sig) };
    }
    for pid in session_members(sid) {
        // SAFETY: plain syscall on a pid that was a member of the session a moment ago.
        unsafe { libc::kill(pid, sig) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn spawn_runs_in_a_terminal_of_the_given_size() {
        let mut cmd = Command::new("/bin/sh");
        cmd.args(["-c", "stty size; test -t 0 && echo tty"]);
        let (master, mut child) = spawn(cmd, 91, 17).expect("spawn");
        let mut out = Vec::new();
        let mut buf = [0u8; 1024];
        loop {
            match master.file().read(&mut buf) {
                Ok(0) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break, // EIO: the slave is closed
            }
        }
        let _ = child.wait();
        let text = String::from_utf8_lossy(&out);
        assert!(text.contains("17 91"), "{text:?}");
        assert!(text.contains("tty"), "{text:?}");
    }

    #[test]
    fn resize_and_write() {
        let mut cmd = Command::new("/bin/sh");
        cmd.args(["-c", "read x; stty size; echo got-$x"]);
        let (master, mut child) = spawn(cmd, 80, 24).expect("spawn");
        master.resize(120, 40).expect("resize");
        master.file().write_all(b"abc\n").expect("write");
        let mut out = Vec::new();
        let mut buf = [0u8; 1024];
        while let Ok(n) = master.file().read(&mut buf) {
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
        let _ = child.wait();
        let text = String::from_utf8_lossy(&out);
        assert!(text.contains("40 120"), "{text:?}");
        assert!(text.contains("got-abc"), "{text:?}");
    }
}
