//! Terminal helpers for the `clawterm` CLI: raw mode restored on every exit path, window size,
//! and a self-pipe that turns signals (SIGWINCH, SIGTERM, SIGHUP, SIGINT) into readable bytes.

use std::fs::File;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Mutex;

/// The terminal settings to restore (fd, termios), shared with the panic hook.
static SAVED: Mutex<Option<(RawFd, libc::termios)>> = Mutex::new(None);

/// Puts a terminal in raw mode; restores it on drop (and from the panic hook installed by
/// [`RawMode::enable`]).
pub struct RawMode {
    _private: (),
}

/// Whether `fd` is a terminal.
pub fn is_tty(fd: RawFd) -> bool {
    // SAFETY: isatty only inspects the descriptor.
    unsafe { libc::isatty(fd) == 1 }
}

/// Restores the saved terminal settings, if any (idempotent; async-signal tolerant enough for
/// the panic and exit paths it is used on).
pub fn restore_terminal() {
    let saved = match SAVED.try_lock() {
        Ok(mut g) => g.take(),
        Err(_) => None,
    };
    if let Some((fd, t)) = saved {
        // SAFETY: restoring settings previously read from the same descriptor.
        unsafe {
            libc::tcsetattr(fd, libc::TCSAFLUSH, &t);
        }
    }
}

impl RawMode {
    /// Raw mode on `fd` (usually 0). Installs a panic hook that restores the terminal first.
    pub fn enable(fd: RawFd) -> std::io::Result<RawMode> {
        // SAFETY: termios is a C struct of integers and arrays of integers, for which all-zero
        // bytes are a valid value.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: `&mut t` is a valid, exclusive pointer to a termios that lives across the
        // call; tcgetattr only writes that struct, and a bad or non-terminal `fd` is reported
        // as -1/errno (EBADF, ENOTTY), not undefined behaviour.
        if unsafe { libc::tcgetattr(fd, &mut t) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        *SAVED.lock().unwrap_or_else(|e| e.into_inner()) = Some((fd, t));
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            restore_terminal();
            prev(info);
        }));
        let mut raw = t;
        // SAFETY: cfmakeraw only edits the termios behind the valid, exclusive pointer.
        unsafe { libc::cfmakeraw(&mut raw) };
        // SAFETY: `&raw` points to an initialised termios (read by tcgetattr, then edited by
        // cfmakeraw) that outlives the call; tcsetattr only reads it, and TCSAFLUSH is a valid
        // action. Failure is reported as -1/errno.
        if unsafe { libc::tcsetattr(fd, libc::TCSAFLUSH, &raw) } != 0 {
            let e = std::io::Error::last_os_error();
            restore_terminal();
            return Err(e);
        }
        Ok(RawMode { _private: () })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        restore_terminal();
    }
}

/// `(cols, rows)` of the terminal on `fd`.
pub fn window_size(fd: RawFd) -> Option<(u16, u16)> {
    // SAFETY: winsize is four u16 fields; all-zero bytes are a valid value.
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: TIOCGWINSZ takes exactly a `struct winsize *`, and `&mut ws` is a valid,
    // exclusive pointer to one that lives across the call; the kernel writes only that struct.
    // A bad or non-terminal `fd` is reported as -1/errno.
    if unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) } != 0 || ws.ws_col == 0 {
        return None;
    }
    Some((ws.ws_col, ws.ws_row))
}

static SIG_PIPE_W: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_signal(sig: libc::c_int) {
    let fd = SIG_PIPE_W.load(Ordering::Relaxed);
    if fd >= 0 {
        let b = sig as u8;
        // SAFETY: write(2) is async-signal-safe; a full pipe just drops the byte.
        unsafe {
            libc::write(fd, &b as *const u8 as *const libc::c_void, 1);
        }
    }
}

/// Installs handlers for `signals` that write the signal number (one byte) to a non-blocking
/// pipe; returns the pipe's read end.
pub fn signal_pipe(signals: &[libc::c_int]) -> std::io::Result<File> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: pipe2 fills two descriptors.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    SIG_PIPE_W.store(fds[1], Ordering::Relaxed);
    for &s in signals {
        // SAFETY: a plain handler that only calls write(2).
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as usize;
            sa.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut sa.sa_mask);
            if libc::sigaction(s, &sa, std::ptr::null_mut()) != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
    }
    // SAFETY: pipe2 just created `fds[0]`; nothing else owns it (the write end stays open for
    // the process's life: the handler writes to it).
    Ok(File::from(unsafe { OwnedFd::from_raw_fd(fds[0]) }))
}

/// The ssh-style escape filter: after Enter (or at the start), `~.` detaches, `~X` ends the
/// session, `~?` asks for help, `~~` sends one `~`; any other `~c` sends both bytes.
#[derive(Debug, Default)]
pub struct EscapeFilter {
    /// Not at the start of a line.
    mid_line: bool,
    /// A `~` at the start of a line is held back.
    pending_tilde: bool,
}

/// What the user asked for with an escape.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum EscapeCmd {
    Detach,
    End,
    Help,
}

impl EscapeFilter {
    /// Filters typed bytes: returns the bytes to send and any escape command (bytes after the
    /// command are dropped).
    pub fn feed(&mut self, input: &[u8]) -> (Vec<u8>, Option<EscapeCmd>) {
        let mut out = Vec::with_capacity(input.len());
        for &b in input {
            if self.pending_tilde {
                self.pending_tilde = false;
                match b {
                    b'.' => return (out, Some(EscapeCmd::Detach)),
                    b'X' => return (out, Some(EscapeCmd::End)),
                    b'?' => {
                        self.mid_line = false;
                        return (out, Some(EscapeCmd::Help));
                    }
                    b'~' => {
                        out.push(b'~');
                        self.mid_line = true;
                        continue;
                    }
                    _ => out.push(b'~'),
                }
            } else if b == b'~' && !self.mid_line {
                self.pending_tilde = true;
                continue;
            }
            out.push(b);
            self.mid_line = !(b == b'\r' || b == b'\n');
        }
        (out, None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes() {
        let mut f = EscapeFilter::default();
        assert_eq!(f.feed(b"~."), (vec![], Some(EscapeCmd::Detach)));
        let mut f = EscapeFilter::default();
        assert_eq!(f.feed(b"ls\r~~x"), (b"ls\r~x".to_vec(), None));
        assert_eq!(f.feed(b"a~."), (b"a~.".to_vec(), None));
        assert_eq!(f.feed(b"\r~"), (b"\r".to_vec(), None));
        assert_eq!(f.feed(b"X"), (vec![], Some(EscapeCmd::End)));
        let mut f = EscapeFilter::default();
        assert_eq!(f.feed(b"~a"), (b"~a".to_vec(), None));
    }
}
