//! The interactive terminal of `clawterm connect` and `clawterm resume`: the terminal in raw
//! mode, typed bytes (through the `~` escapes) to the session and the session's output to
//! stdout, window size changes (SIGWINCH) as RESIZE, a status line while the connection is
//! down, and the saved credentials and local state kept current.

use crate::creds::unix_now;
use crate::tty::{self, EscapeCmd, EscapeFilter, RawMode};
use crate::{ClientError, Event, LocalState, Session, StateRecord, Store};
use clawterm_poll as poll;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Runs the interactive session `name` (saved in `store`) until it is detached or ends, or a
/// signal or fatal error stops it, appending its output to `log` when given. Returns the exit
/// status (see `ClientError::exit_code`; 128 + the signal number for a signal).
pub fn attach(mut session: Session, name: &str, store: &Store, log: Option<PathBuf>) -> u8 {
    let save = |s: &Session| {
        let mut c = s.credentials(name);
        c.last_seen = unix_now();
        store.save(&c)
    };
    if let Err(e) = save(&session) {
        eprintln!("clawterm: warning: session credentials not saved: {e}");
    }
    let set_state = |st: LocalState| {
        let _ = store.save_state(name, &StateRecord::now(st));
    };
    set_state(LocalState::Attached);
    let mut log = match log {
        Some(p) => match std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&p)
        {
            Ok(f) => Some(f),
            Err(e) => {
                eprintln!("clawterm: cannot open log file {}: {e}", p.display());
                return 2;
            }
        },
        None => None,
    };
    let via = match session.tls_info() {
        Some((v, c)) => format!("{v}, {c}"),
        None => "plaintext".to_string(),
    };
    eprintln!(
        "clawterm: session {name} (id {:08x}) at {} ({via}). Enter ~. detaches, Enter ~X ends it, \
         ~? help; resume with: clawterm resume {name}",
        session.session_id(),
        session.endpoint()
    );
    let raw = if tty::is_tty(std::io::stdin()) {
        match RawMode::enable(std::io::stdin()) {
            Ok(r) => Some(r),
            Err(e) => {
                eprintln!("clawterm: cannot put the terminal in raw mode: {e}");
                None
            }
        }
    } else {
        None
    };
    let outcome = run_loop(
        &mut session,
        name,
        &mut log,
        raw.is_some(),
        &save,
        &set_state,
    );
    drop(raw);
    match outcome {
        Outcome::Detached => {
            let c = session.credentials(name);
            let _ = store.save(&c);
            set_state(LocalState::Detached);
            session.detach();
            eprintln!("clawterm: detached; the session keeps running. Resume with: clawterm resume {name}");
            0
        }
        Outcome::EndRequested => {
            session.end();
            let _ = store.remove(name);
            eprintln!("clawterm: session ended");
            0
        }
        Outcome::Ended => {
            let _ = store.remove(name);
            eprintln!("clawterm: the session ended");
            0
        }
        Outcome::Signal(sig) => {
            let _ = save(&session);
            set_state(LocalState::Detached);
            drop(session);
            eprintln!("clawterm: stopped by signal {sig}; the session keeps running. Resume with: clawterm resume {name}");
            128u8.wrapping_add(sig as u8)
        }
        Outcome::Error(e) => {
            if e == ClientError::NoSuchSession {
                let _ = store.remove(name);
            } else if e == ClientError::TakenOver {
                set_state(LocalState::TakenOver);
            } else {
                let _ = save(&session);
                set_state(LocalState::Detached);
            }
            eprintln!("clawterm: {e}");
            e.exit_code()
        }
    }
}

/// The "connection down" line: on the terminal's last row (cursor saved and restored), or plain
/// lines when the output is not a terminal.
struct StatusLine<W: Write> {
    out: W,
    /// The terminal's `(cols, rows)`; `None` when the output is not a terminal.
    size: fn() -> Option<(u16, u16)>,
    tty: bool,
    shown: bool,
    last_text: String,
}

impl<W: Write> StatusLine<W> {
    fn show(&mut self, text: &str) {
        if text == self.last_text && self.shown {
            return;
        }
        self.last_text = text.to_string();
        let err = &mut self.out;
        if self.tty {
            let (cols, rows) = (self.size)().unwrap_or((80, 24));
            let t: String = text.chars().take(cols.saturating_sub(1) as usize).collect();
            if !self.shown {
                // Make room instead of drawing over the bottom row (the cursor's row, most of
                // the time: a prompt, a half-printed line): a line feed on the bottom row
                // scrolls the screen up by one, then the cursor follows its text up a row.
                let _ = write!(err, "\x1b7\x1b[{rows};1H\n\x1b8\x1b[A");
            }
            let _ = write!(err, "\x1b7\x1b[{rows};1H\x1b[2K\x1b[7m{t}\x1b[0m\x1b8");
        } else {
            let _ = writeln!(err, "{text}");
        }
        let _ = err.flush();
        self.shown = true;
    }

    fn clear(&mut self) {
        if !self.shown {
            return;
        }
        self.shown = false;
        self.last_text.clear();
        let err = &mut self.out;
        if self.tty {
            let rows = (self.size)().map(|w| w.1).unwrap_or(24);
            let _ = write!(err, "\x1b7\x1b[{rows};1H\x1b[2K\x1b8");
        } else {
            let _ = writeln!(err, "clawterm: reconnected");
        }
        let _ = err.flush();
    }
}

/// Prints a message on its own line (raw mode needs \r\n).
fn say(raw: bool, msg: &str) {
    let mut err = std::io::stderr().lock();
    if raw {
        let _ = write!(err, "\r\n{msg}\r\n");
    } else {
        let _ = writeln!(err, "{msg}");
    }
    let _ = err.flush();
}

/// The `~?` help.
fn escape_help(name: &str) -> String {
    format!(
        "clawterm escapes (after Enter): ~. detach (resume: clawterm resume {name})  ~X end the session  ~~ send ~  ~? help"
    )
}

#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Detached,
    EndRequested,
    Ended,
    Signal(i32),
    Error(ClientError),
}

/// What the typed bytes `input` do: the bytes to send (through the escape filter in raw mode)
/// and how the session ends, if it does.
fn typed(esc: &mut EscapeFilter, raw: bool, input: &[u8]) -> (Vec<u8>, Option<EscapeCmd>) {
    if raw {
        esc.feed(input)
    } else {
        (input.to_vec(), None)
    }
}

fn run_loop(
    session: &mut Session,
    name: &str,
    log: &mut Option<File>,
    raw: bool,
    save: &dyn Fn(&Session) -> Result<PathBuf, ClientError>,
    set_state: &dyn Fn(LocalState),
) -> Outcome {
    let sigfd = match tty::signal_pipe(&[libc::SIGWINCH, libc::SIGTERM, libc::SIGHUP, libc::SIGINT])
    {
        Ok(fd) => Some(fd),
        Err(e) => {
            eprintln!("clawterm: warning: no signal handling: {e}");
            None
        }
    };
    if let Some((c, r)) = tty::stdio_window_size() {
        let _ = session.resize(c, r);
    }
    let mut status = StatusLine {
        out: std::io::stderr(),
        size: || tty::window_size(std::io::stderr()),
        tty: tty::is_tty(std::io::stderr()),
        shown: false,
        last_text: String::new(),
    };
    let mut esc = EscapeFilter::default();
    let mut stdin_open = true;
    let mut retry: Option<(Instant, String)> = None;
    let mut last_save = Instant::now();
    let mut dirty = false;
    let mut stdout = std::io::stdout().lock();
    let stdin = std::io::stdin();
    loop {
        // Events.
        loop {
            match session.try_recv() {
                Ok(None) => break,
                Ok(Some(ev)) => match ev {
                    Event::Data(d) => {
                        let _ = stdout.write_all(&d);
                        if let Some(f) = log.as_mut() {
                            let _ = f.write_all(&d);
                        }
                        dirty = true;
                    }
                    Event::Gap => {
                        let _ = stdout.flush();
                        say(raw, "clawterm: some output was lost while disconnected (the server's replay buffer overflowed)");
                    }
                    Event::Disconnected {
                        reason,
                        retry_in,
                        attempt,
                    } => {
                        if attempt == 0 {
                            set_state(LocalState::Reconnecting);
                        }
                        retry = Some((Instant::now() + retry_in, reason));
                    }
                    Event::Reconnecting { .. } => {
                        let _ = stdout.flush();
                        let reason = retry.as_ref().map(|r| r.1.clone()).unwrap_or_default();
                        status.show(&format!(
                            "clawterm: connection lost ({reason}); reconnecting now… (~. detaches)"
                        ));
                        retry = None;
                    }
                    Event::Reconnected { .. } => {
                        retry = None;
                        status.clear();
                        let _ = save(session);
                        set_state(LocalState::Attached);
                    }
                    Event::Ended => {
                        let _ = stdout.flush();
                        return Outcome::Ended;
                    }
                },
                Err(e) => {
                    let _ = stdout.flush();
                    status.clear();
                    return Outcome::Error(e);
                }
            }
        }
        let _ = stdout.flush();
        if let Some((at, reason)) = &retry {
            // The session's own deadline: typing may have moved the retry earlier.
            let at = session.next_deadline().map_or(*at, |d| d.min(*at));
            let left = at.saturating_duration_since(Instant::now());
            status.show(&format!(
                "clawterm: connection lost ({reason}); retrying in {} s; input is queued (~. detaches)",
                left.as_secs() + u64::from(left.subsec_millis() > 0)
            ));
        }
        if dirty && last_save.elapsed() >= Duration::from_secs(2) {
            let _ = save(session);
            last_save = Instant::now();
            dirty = false;
        }

        // Wait.
        let mut wait = Duration::from_millis(1000);
        if let Some(d) = session.next_deadline() {
            wait = wait.min(d.saturating_duration_since(Instant::now()));
        }
        let ms = (wait.as_millis() as i32).max(1);
        let mut revents = [0i16; 3];
        let (stdin_ix, sig_ix, n) = {
            let mut fds: Vec<(BorrowedFd<'_>, i16)> = Vec::with_capacity(3);
            let stdin_ix = stdin_open.then(|| {
                fds.push((stdin.as_fd(), libc::POLLIN));
                fds.len() - 1
            });
            let sig_ix = sigfd.as_ref().map(|f| {
                fds.push((f.as_fd(), libc::POLLIN));
                fds.len() - 1
            });
            if let Some(fd) = session.poll_fd() {
                let ev = libc::POLLIN
                    | if session.wants_write() {
                        libc::POLLOUT
                    } else {
                        0
                    };
                fds.push((fd, ev));
            }
            (
                stdin_ix,
                sig_ix,
                poll::wait(&fds, &mut revents, ms).unwrap_or(0),
            )
        };
        if n == 0 {
            continue;
        }
        if let Some(i) = sig_ix {
            if revents[i] & libc::POLLIN != 0 {
                let mut b = [0u8; 64];
                let k = sigfd
                    .as_ref()
                    .map_or(0, |mut f| f.read(&mut b).unwrap_or(0));
                for &s in b.iter().take(k) {
                    match s as i32 {
                        libc::SIGWINCH => {
                            if let Some((c, r)) = tty::stdio_window_size() {
                                let _ = session.resize(c, r);
                            }
                        }
                        sig => return Outcome::Signal(sig),
                    }
                }
            }
        }
        if let Some(i) = stdin_ix {
            if revents[i] & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
                let mut b = [0u8; 4096];
                // Unbuffered: what poll saw is what is read (std's Stdin would buffer).
                match rustix::io::read(stdin.as_fd(), &mut b) {
                    Err(rustix::io::Errno::INTR | rustix::io::Errno::AGAIN) => {}
                    // End of input: keep showing output until the session ends.
                    Ok(0) | Err(_) => stdin_open = false,
                    Ok(k) => {
                        let (bytes, cmd) = typed(&mut esc, raw, &b[..k]);
                        if !bytes.is_empty() {
                            if let Err(e) = session.send(&bytes) {
                                return Outcome::Error(e);
                            }
                            // Someone is typing while the connection is down: try again soon
                            // rather than at the end of a long backoff wait.
                            session.retry_now();
                        }
                        match cmd {
                            Some(EscapeCmd::Detach) => return Outcome::Detached,
                            Some(EscapeCmd::End) => return Outcome::EndRequested,
                            Some(EscapeCmd::Help) => say(raw, &escape_help(name)),
                            None => {}
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(tty: bool) -> StatusLine<Vec<u8>> {
        StatusLine {
            out: Vec::new(),
            size: || Some((10, 30)),
            tty,
            shown: false,
            last_text: String::new(),
        }
    }

    #[test]
    fn status_line_on_a_pipe_is_plain_lines_once_each() {
        let mut s = line(false);
        s.clear();
        s.show("down");
        s.show("down");
        s.show("still down");
        s.clear();
        s.clear();
        assert_eq!(
            String::from_utf8(s.out).unwrap(),
            "down\nstill down\nclawterm: reconnected\n"
        );
    }

    #[test]
    fn status_line_on_a_terminal_uses_the_last_row_and_fits_the_width() {
        let mut s = line(true);
        s.show("connection lost, retrying");
        s.show("connection lost, retrying");
        s.clear();
        assert_eq!(
            String::from_utf8(s.out).unwrap(),
            "\x1b7\x1b[30;1H\n\x1b8\x1b[A\x1b7\x1b[30;1H\x1b[2K\x1b[7mconnectio\x1b[0m\x1b8\
             \x1b7\x1b[30;1H\x1b[2K\x1b8"
        );
    }

    #[test]
    fn typed_bytes_go_through_the_escapes_only_in_raw_mode() {
        let mut esc = EscapeFilter::default();
        assert_eq!(
            typed(&mut esc, false, b"~."),
            (b"~.".to_vec(), None),
            "a pipe sends everything"
        );
        let mut esc = EscapeFilter::default();
        assert_eq!(typed(&mut esc, true, b"ls\r"), (b"ls\r".to_vec(), None));
        assert_eq!(
            typed(&mut esc, true, b"~?"),
            (vec![], Some(EscapeCmd::Help))
        );
        assert_eq!(typed(&mut esc, true, b"~X"), (vec![], Some(EscapeCmd::End)));
        assert!(escape_help("dev").contains("clawterm resume dev"));
    }
}
