//! `claw-agent shell`: a login shell in a PTY per session (80x24 until the client says
//! otherwise). RESIZE sets the window size; PAUSE stops reading the terminal (the program
//! waits, nothing is lost); the shell keeps running while the client is away. The shell's exit
//! closes the session; closing the session hangs up its terminal (SIGHUP to every process of
//! the terminal's session, then SIGKILL after 2 s).

use super::pty::{self, PtyMaster};
use super::{
    input_queue, Agent, CloseReason, InputReceiver, InputSender, OpenInfo, Outbox, SessionId,
};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

/// Initial window size of a session's terminal (until the first RESIZE).
const SHELL_COLS: u16 = 80;
const SHELL_ROWS: u16 = 24;
/// How long a hung-up session gets between SIGHUP and SIGKILL.
const SHELL_KILL_GRACE: Duration = Duration::from_secs(2);
/// After the shell exited, output still arriving within this long is sent before the CLOSE
/// (a background job may keep the terminal open; we don't wait for it).
const SHELL_DRAIN_MS: i32 = 100;
/// PTY read chunk.
const SHELL_READ_CHUNK: usize = 64 * 1024;

/// The shell to run: `--shell`, else $SHELL, else /bin/sh.
pub fn shell_path(arg: Option<PathBuf>) -> PathBuf {
    arg.or_else(|| {
        std::env::var_os("SHELL")
            .filter(|s| !s.is_empty())
            .map(PathBuf::from)
    })
    .unwrap_or_else(|| PathBuf::from("/bin/sh"))
}

/// `shell`: a login shell in a PTY per session.
pub struct ShellAgent {
    shell: Arc<PathBuf>,
    sessions: HashMap<SessionId, ShellSession>,
}

/// One session's shell. Its threads: a reader (PTY -> DATA, then CLOSE when the shell exits),
/// a writer (DATA -> PTY) and a waiter (reaps the shell).
struct ShellSession {
    /// The shell's pid: also its session id and process group id.
    pid: libc::pid_t,
    /// The PTY master; the reader holds the only strong reference, so the terminal is hung up
    /// as soon as the reader is done.
    master: Weak<PtyMaster>,
    /// Input for the writer thread (bounded: see [`input_queue`](super::input_queue)).
    input: InputSender,
    /// Dropping it tells the reader and the writer that the session is over.
    _stop: UnixStream,
    /// `true` once the shell has been reaped; signals to its pid are sent under this lock, so
    /// they can't reach a process that reused the pid.
    reaped: Arc<Mutex<bool>>,
    /// The shell exited by itself and the reader has sent its output and the CLOSE.
    done: Arc<AtomicBool>,
}

fn lock(m: &Mutex<bool>) -> std::sync::MutexGuard<'_, bool> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl ShellSession {
    /// Hangs the session up: SIGHUP (and SIGCONT, for stopped jobs) to every process of the
    /// terminal's session now, SIGKILL to those left after [`SHELL_KILL_GRACE`]. Nothing is
    /// signalled if the shell has exited by itself already (whatever it left running is
    /// hung up by the kernel when the terminal closes, as in any terminal).
    fn kill(self) {
        let ShellSession {
            pid,
            input,
            _stop: stop,
            reaped,
            ..
        } = self;
        // Ends the writer and the reader (which drops the PTY).
        drop((input, stop));
        {
            let reaped = lock(&reaped);
            if *reaped {
                return;
            }
            pty::signal_session(pid, libc::SIGHUP, true);
            pty::signal_session(pid, libc::SIGCONT, true);
        }
        let reaped2 = Arc::clone(&reaped);
        let spawned = std::thread::Builder::new()
            .name("shell-kill".into())
            .spawn(move || {
                let deadline = Instant::now() + SHELL_KILL_GRACE;
                loop {
                    if *lock(&reaped2) && pty::session_members(pid).is_empty() {
                        return;
                    }
                    if Instant::now() >= deadline {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                let reaped = lock(&reaped2);
                pty::signal_session(pid, libc::SIGKILL, !*reaped);
            });
        if spawned.is_err() {
            // No thread for the grace period: kill now rather than never.
            let reaped = lock(&reaped);
            pty::signal_session(pid, libc::SIGKILL, !*reaped);
        }
    }
}

/// Waits for `pid` (our child) to exit without reaping it.
fn wait_exit_noreap(pid: libc::pid_t) {
    loop {
        // SAFETY: an all-zero siginfo_t is a valid value of this plain C struct.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: waitid writes one siginfo_t into `info`, valid for the call. WNOWAIT leaves
        // the child to be reaped by `Child::wait`.
        let rc = unsafe {
            libc::waitid(
                libc::P_PID,
                pid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOWAIT,
            )
        };
        if rc == 0 || std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            return;
        }
    }
}

/// How a session's reader ended.
enum ReaderEnd {
    /// The shell exited and its output is sent: the session should be closed.
    ShellExited,
    /// The session or the link was closed: nothing more to send.
    Closed,
}

/// Reads the PTY and sends its output as DATA, waiting while the session is paused (the
/// program then blocks on a full terminal). Ends when the session is over (`stop` hung up, or
/// the Outbox says so) or the shell has exited (`exit` hung up) and its output is drained.
fn shell_reader(
    s: SessionId,
    out: &Outbox,
    master: &PtyMaster,
    stop: &UnixStream,
    exit: &UnixStream,
) -> ReaderEnd {
    use std::os::fd::AsFd;
    let mut buf = vec![0u8; SHELL_READ_CHUNK];
    let mut exited = false;
    let mut eof = false;
    loop {
        if !out.wait_sendable(s) {
            return ReaderEnd::Closed;
        }
        let mut rev = [0i16; 3];
        let polled = if eof {
            // The terminal is closed on the shell's side: wait for the shell to be reaped.
            clawterm_poll::wait(
                &[(stop.as_fd(), libc::POLLIN), (exit.as_fd(), libc::POLLIN)],
                &mut rev[1..],
                -1,
            )
        } else if exited {
            clawterm_poll::wait(
                &[(master.as_fd(), libc::POLLIN), (stop.as_fd(), libc::POLLIN)],
                &mut rev[..2],
                SHELL_DRAIN_MS,
            )
        } else {
            clawterm_poll::wait(
                &[
                    (master.as_fd(), libc::POLLIN),
                    (stop.as_fd(), libc::POLLIN),
                    (exit.as_fd(), libc::POLLIN),
                ],
                &mut rev,
                -1,
            )
        };
        let n = match polled {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(session = s, error = %e, "shell: poll failed");
                return ReaderEnd::Closed;
            }
        };
        if eof {
            if rev[1] != 0 {
                return ReaderEnd::Closed;
            }
            if rev[2] != 0 {
                return ReaderEnd::ShellExited;
            }
            continue;
        }
        if n == 0 {
            // Draining after the shell's exit, and nothing more came.
            return ReaderEnd::ShellExited;
        }
        if rev[1] != 0 {
            return ReaderEnd::Closed;
        }
        if !exited && rev[2] != 0 {
            exited = true;
        }
        if rev[0] == 0 {
            continue;
        }
        match master.file().read(&mut buf) {
            Ok(0) => eof = true,
            Ok(n) => {
                if out.data(s, &buf[..n]).is_err() {
                    return ReaderEnd::Closed; // the link is gone
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if rev[0] & (libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0 {
                    eof = true;
                }
            }
            // EIO: every process has closed the terminal.
            Err(_) => eof = true,
        }
        if eof && exited {
            return ReaderEnd::ShellExited;
        }
    }
}

/// Calls [`InputReceiver::done`] when dropped.
struct Done<'a>(&'a InputReceiver, usize);

impl Drop for Done<'_> {
    fn drop(&mut self) {
        self.0.done(self.1);
    }
}

/// Writes session input to the PTY (non-blocking, so it can give up when the session ends
/// even if the program never reads). Ends with the session or with the reader.
fn shell_writer(
    master: Weak<PtyMaster>,
    input: InputReceiver,
    reader_gone: crossbeam_channel::Receiver<()>,
    stop: UnixStream,
    exit: UnixStream,
) {
    use std::os::fd::AsFd;
    loop {
        let chunk = crossbeam_channel::select! {
            recv(input.channel()) -> chunk => match chunk {
                Ok(chunk) => chunk,
                Err(_) => return, // the session is over
            },
            // The reader is done (the shell exited, or the session is over): so are we.
            recv(reader_gone) -> _ => return,
        };
        // Leaves the queue whether written or given up.
        let _done = Done(&input, chunk.len());
        let Some(m) = master.upgrade() else { return };
        let mut at = 0;
        while at < chunk.len() {
            match m.file().write(&chunk[at..]) {
                Ok(0) => return,
                Ok(n) => at += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    let mut rev = [0i16; 3];
                    let polled = clawterm_poll::wait(
                        &[
                            (m.as_fd(), libc::POLLOUT),
                            (stop.as_fd(), libc::POLLIN),
                            (exit.as_fd(), libc::POLLIN),
                        ],
                        &mut rev,
                        -1,
                    );
                    if polled.is_err() || rev[1] != 0 || rev[2] != 0 {
                        return;
                    }
                }
                Err(_) => return, // EIO: the terminal is gone
            }
        }
    }
}

impl ShellAgent {
    /// An agent that starts `shell` as a login shell in a PTY for each session.
    pub fn new(shell: Arc<PathBuf>) -> ShellAgent {
        ShellAgent {
            shell,
            sessions: HashMap::new(),
        }
    }

    fn spawn(&self, s: SessionId, info: &OpenInfo, out: &Outbox) -> std::io::Result<ShellSession> {
        use std::os::unix::process::CommandExt;
        // Everything that can fail is set up before the shell starts; the threads get their
        // PTY and child through channels (and end at once if those are dropped instead).
        let (stop_tx, stop_rx) = UnixStream::pair()?;
        let (exit_tx, exit_rx) = UnixStream::pair()?;
        let (stop_w, exit_w) = (stop_rx.try_clone()?, exit_rx.try_clone()?);
        let reaped = Arc::new(Mutex::new(false));
        let done = Arc::new(AtomicBool::new(false));
        let (in_tx, in_rx) = input_queue(s, out);
        let (child_tx, child_rx) = crossbeam_channel::bounded::<std::process::Child>(1);
        let (wm_tx, wm_rx) = crossbeam_channel::bounded::<Weak<PtyMaster>>(1);
        let (rm_tx, rm_rx) = crossbeam_channel::bounded::<Arc<PtyMaster>>(1);
        let (gone_tx, gone_rx) = crossbeam_channel::bounded::<()>(0);

        // The waiter: reaps the shell (under the `reaped` lock, see ShellSession::kill), then
        // hangs up `exit`, which tells the reader and the writer.
        let reaped2 = Arc::clone(&reaped);
        std::thread::Builder::new()
            .name(format!("shell-{s}-wait"))
            .spawn(move || {
                let Ok(mut child) = child_rx.recv() else {
                    return;
                };
                wait_exit_noreap(child.id() as libc::pid_t);
                let mut reaped = lock(&reaped2);
                let status = child.wait();
                *reaped = true;
                drop(reaped);
                tracing::debug!(session = s, ?status, "shell: exited");
                drop(exit_tx);
            })?;
        std::thread::Builder::new()
            .name(format!("shell-{s}-in"))
            .spawn(move || {
                if let Ok(m) = wm_rx.recv() {
                    shell_writer(m, in_rx, gone_rx, stop_w, exit_w);
                }
            })?;
        let (out2, done2) = (out.clone(), Arc::clone(&done));
        std::thread::Builder::new()
            .name(format!("shell-{s}-out"))
            .spawn(move || {
                let _gone = gone_tx; // dropped when this thread ends: stops the writer
                let Ok(master) = rm_rx.recv() else {
                    return;
                };
                let end = shell_reader(s, &out2, &master, &stop_rx, &exit_rx);
                drop(master); // hangs up the terminal for whatever is left on it
                if let ReaderEnd::ShellExited = end {
                    let _ = out2.close(s, CloseReason::Normal);
                    done2.store(true, Ordering::SeqCst);
                }
            })?;

        let shell = &*self.shell;
        let name = shell
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "sh".to_owned());
        let mut cmd = Command::new(shell);
        cmd.arg0(format!("-{name}")) // a login shell
            .env("CLAW_TENANT", info.tenant.to_string())
            .env("CLAW_AGENT", info.agent.to_string())
            .env("CLAW_SESSION", s.to_string())
            .env("CLAW_PEER", &info.peer);
        if std::env::var_os("TERM").is_none() {
            cmd.env("TERM", "xterm-256color");
        }
        let (master, mut child) = pty::spawn(cmd, SHELL_COLS, SHELL_ROWS)?;
        let pid = child.id() as libc::pid_t;
        if let Err(e) = master.set_nonblocking() {
            // SAFETY: plain syscall; `pid` is our unreaped child, hence its process group id.
            unsafe { libc::killpg(pid, libc::SIGKILL) };
            let _ = child.wait();
            return Err(e);
        }
        let master = Arc::new(master);
        let weak = Arc::downgrade(&master);
        // The threads are parked on these channels, so the sends can't fail unless a thread
        // died; then the session just ends early.
        let _ = child_tx.send(child);
        let _ = wm_tx.send(weak.clone());
        let _ = rm_tx.send(master);

        Ok(ShellSession {
            pid,
            master: weak,
            input: in_tx,
            _stop: stop_tx,
            reaped,
            done,
        })
    }
}

impl Agent for ShellAgent {
    fn open(&mut self, s: SessionId, info: &OpenInfo, out: &Outbox) {
        // Forget sessions whose shell has exited (their CLOSE has been sent).
        self.sessions.retain(|_, x| !x.done.load(Ordering::SeqCst));
        if let Some(old) = self.sessions.remove(&s) {
            old.kill();
        }
        match self.spawn(s, info, out) {
            Ok(x) => {
                tracing::debug!(
                    session = s,
                    pid = x.pid,
                    reopen = info.reopen,
                    "shell: started"
                );
                self.sessions.insert(s, x);
            }
            Err(e) => {
                tracing::warn!(session = s, error = %e, "shell: cannot start the shell");
                let msg = format!("claw-agent: cannot run {}: {e}\r\n", self.shell.display());
                let _ = out.data(s, msg.as_bytes());
                let _ = out.close(s, CloseReason::Error);
            }
        }
    }

    fn data(&mut self, s: SessionId, bytes: &[u8], _out: &Outbox) {
        if let Some(x) = self.sessions.get_mut(&s) {
            x.input.push(bytes);
        }
    }

    fn resize(&mut self, s: SessionId, cols: u16, rows: u16, _out: &Outbox) {
        if let Some(m) = self.sessions.get(&s).and_then(|x| x.master.upgrade()) {
            if let Err(e) = m.resize(cols, rows) {
                tracing::debug!(session = s, error = %e, "shell: resize failed");
            }
        }
    }

    fn close(&mut self, s: SessionId, _reason: CloseReason, _out: &Outbox) {
        if let Some(x) = self.sessions.remove(&s) {
            x.kill();
        }
        self.sessions.retain(|_, x| !x.done.load(Ordering::SeqCst));
    }

    fn link_closed(&mut self, _out: &Outbox) {
        for (_, x) in self.sessions.drain() {
            x.kill();
        }
    }
}
