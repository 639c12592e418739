//! Terminal helpers for the `clawterm` CLI: raw mode restored on every exit path, window size,
//! and a self-pipe that turns signals (SIGWINCH, SIGTERM, SIGHUP, SIGINT) into readable bytes.

use rustix::termios::{self, OptionalActions, Termios};
use std::fs::File;
use std::os::fd::{AsFd, IntoRawFd, OwnedFd};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Mutex;

/// The terminal settings to restore (a duplicate of the terminal's descriptor, and its
/// settings before raw mode), shared with the panic hook.
static SAVED: Mutex<Option<(OwnedFd, Termios)>> = Mutex::new(None);

/// Puts a terminal in raw mode; restores it on drop (and from the panic hook installed by
/// [`RawMode::enable`]).
pub struct RawMode {
    _private: (),
}

/// Whether `fd` is a terminal.
pub fn is_tty(fd: impl AsFd) -> bool {
    termios::isatty(fd)
}

/// Restores the saved terminal settings, if any (idempotent; async-signal tolerant enough for
/// the panic and exit paths it is used on).
pub fn restore_terminal() {
    let saved = match SAVED.try_lock() {
        Ok(mut g) => g.take(),
        Err(_) => None,
    };
    if let Some((fd, t)) = saved {
        let _ = termios::tcsetattr(&fd, OptionalActions::Flush, &t);
    }
}

impl RawMode {
    /// Raw mode on the terminal `fd` (usually stdin). Installs a panic hook that restores the
    /// terminal first.
    pub fn enable(fd: impl AsFd) -> std::io::Result<RawMode> {
        let t = termios::tcgetattr(&fd)?;
        // A duplicate, so that the terminal can be restored whoever owns `fd`.
        let dup = rustix::io::fcntl_dupfd_cloexec(&fd, 0)?;
        *SAVED.lock().unwrap_or_else(|e| e.into_inner()) = Some((dup, t.clone()));
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            restore_terminal();
            prev(info);
        }));
        let mut raw = t;
        raw.make_raw();
        if let Err(e) = termios::tcsetattr(&fd, OptionalActions::Flush, &raw) {
            restore_terminal();
            return Err(e.into());
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
pub fn window_size(fd: impl AsFd) -> Option<(u16, u16)> {
    let ws = termios::tcgetwinsize(fd).ok()?;
    (ws.ws_col != 0).then_some((ws.ws_col, ws.ws_row))
}

/// The size of the terminal on stdin, else on stdout.
pub fn stdio_window_size() -> Option<(u16, u16)> {
    window_size(std::io::stdin()).or_else(|| window_size(std::io::stdout()))
}

static SIG_PIPE_W: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_signal(sig: libc::c_int) {
    let fd = SIG_PIPE_W.load(Ordering::Relaxed);
    if fd >= 0 {
        let b = sig as u8;
        // SAFETY: write(2) is async-signal-safe; `fd` is the pipe's write end, open for the
        // life of the process, and `&b` is valid for one byte. A full pipe just drops the byte.
        unsafe {
            libc::write(fd, &b as *const u8 as *const libc::c_void, 1);
        }
    }
}

/// Installs handlers for `signals` that write the signal number (one byte) to a non-blocking
/// pipe; returns the pipe's read end.
pub fn signal_pipe(signals: &[libc::c_int]) -> std::io::Result<File> {
    use rustix::pipe::{pipe_with, PipeFlags};
    let (r, w) = pipe_with(PipeFlags::NONBLOCK | PipeFlags::CLOEXEC)?;
    // The write end stays open for the process's life: the handler writes to it.
    SIG_PIPE_W.store(w.into_raw_fd(), Ordering::Relaxed);
    for &s in signals {
        // SAFETY: sigaction is plain data (all-zero is valid, then filled in); the handler only
        // loads an atomic and calls write(2), both async-signal-safe; `&sa` is valid for the
        // call and a null old-action pointer is allowed.
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
    Ok(File::from(r))
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
