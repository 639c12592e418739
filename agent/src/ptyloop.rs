//! The shell and exec agents' event loop: one thread per link serves every session of that
//! link.
//!
//! The loop owns each session's PTY master (shell) or stdin and output pipe (exec), all
//! non-blocking, and a pidfd for its program, and waits for all of them with one epoll set,
//! plus an eventfd through which the link thread hands it commands (a new session, "input
//! queued", resize, pause/continue, kill, shutdown). Per session that is 2 (shell) or 3 (exec)
//! descriptors and no thread; per link, 1 thread, an epoll and an eventfd.
//!
//! For a shell, the behaviour is the one the per-session reader/writer/waiter threads had
//! (for `exec`, see [`Io::Pipes`]):
//! * output: the master is read while the daemon has not PAUSEd the session; while it has, the
//!   master is not polled for input at all, so the program blocks on a full terminal and
//!   nothing is lost (DATA already read when the PAUSE arrives is held by the [`Outbox`]);
//! * input: the session's [`input_queue`](crate::input_queue) is written to the master without
//!   blocking (the rest waits for `EPOLLOUT`); its PAUSE/CONTINUE accounting is unchanged;
//! * the shell's exit (its pidfd): it is reaped at once; output still arriving within
//!   [`DRAIN`] (a background job may keep the terminal open) is sent, then CLOSE;
//! * kill (CLOSE from the daemon, the session re-opened, the link gone): the master is closed
//!   (the terminal hangs up), SIGHUP and SIGCONT go to the shell's process group at once and to
//!   every other process of its terminal session (one `/proc` pass for all sessions killed
//!   within [`HUP_BATCH`]), SIGKILL to whatever is left after [`KILL_GRACE`] (one pass per
//!   batch again). Signals go to a shell's pid only while it is not reaped, and only this loop
//!   reaps, so they can't reach a process that reused the pid.
//!
//! Back-pressure on the link (the Outbox's queue limit) blocks this loop, i.e. every session of
//! the link, exactly as it would block each reader thread: they all share the one socket.
//!
//! **Daemon restarts** (POD-LINK.md §7). When the link ends without a CLOSE for a session and
//! the listener has a daemon grace, the session is *orphaned* ([`LoopSessions::orphan`]): its
//! loop stops reading its output (the program blocks once its terminal or pipe is full, so
//! nothing is lost; what was read after the link had gone, and could not be sent, is kept too)
//! and turns the input not yet written into a carry-over. The loop keeps running past its
//! link's end while it holds orphans, watching only their pidfds (a program that exits
//! meanwhile is reaped; its output stays). The listener's registry holds a [`LoopOrphan`] (the
//! loop and the session's key). A REOPEN hands the session over ([`LoopSessions::rebind`]): the
//! new link's thread asks the old loop for it and waits for the answer (the old loop waits for
//! nobody: its link is gone), the old loop takes its descriptors out of its epoll set and gives
//! the session up, and the new link's loop adds it under a new key, with a new input queue that
//! starts with the carry-over. The descriptors move; the program, its pid and its unread output
//! stay. When the grace ends, the orphan's end is a kill, as for a CLOSE.

use super::pty::{self, PtyMaster};
use super::{input_queue, InputReceiver, InputSender, Orphan, Outbox, SessionId};
use rustix::event::{epoll, eventfd, EventfdFlags, Timespec};
use rustix::process::{Pid, PidfdFlags, WaitOptions};
use std::collections::{HashMap, HashSet, VecDeque};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// A session's identity in the loop (unique per spawned shell, never reused: a re-opened
/// session id gets a new key, so late events for the old shell can't touch the new one).
pub(crate) type Key = u64;

/// After the shell exited, output still arriving within this long is sent before the CLOSE.
pub(crate) const DRAIN: Duration = Duration::from_millis(100);
/// After an `exec` process exited, its output pipe gets this long to reach EOF (a leftover
/// child may keep it open).
pub(crate) const EXEC_DRAIN: Duration = Duration::from_secs(2);
/// How long a hung-up session gets between SIGHUP and SIGKILL.
pub(crate) const KILL_GRACE: Duration = Duration::from_secs(2);
/// Kills within this long share one `/proc` pass (for SIGHUP now, for SIGKILL later).
const HUP_BATCH: Duration = Duration::from_millis(50);
const KILL_BATCH: Duration = Duration::from_millis(100);
/// Without pidfds (Linux before 5.3), shells are polled for their exit this often.
const NO_PIDFD_TICK: Duration = Duration::from_millis(200);
/// After the link is gone, the loop waits at most this long for its shells to be reaped.
const SHUTDOWN_LIMIT: Duration = Duration::from_secs(10);
/// PTY read chunk.
const READ_CHUNK: usize = 64 * 1024;
/// The eventfd's epoll token (session tokens are `key << 2 | kind`, with keys far below).
const WAKE: u64 = u64::MAX;

/// A freshly spawned program for [`LoopHandle::add`].
pub(crate) struct NewSession {
    pub s: SessionId,
    pub io: Io,
    pub pid: libc::pid_t,
    pub input: InputReceiver,
}

/// How a session's program is connected.
pub(crate) enum Io {
    /// A shell in a PTY (`claw-agent shell`): one descriptor for output and input; the exit
    /// closes the session once output stopped for [`DRAIN`]; a kill hangs the terminal up.
    Pty(PtyMaster),
    /// A process on pipes (`claw-agent exec`): its stdin, and one pipe for its stdout and
    /// stderr; the exit closes the session once that pipe is at EOF (at most
    /// [`EXEC_DRAIN`] later); a kill is SIGTERM to its process group, SIGKILL after
    /// [`KILL_GRACE`].
    Pipes {
        stdin: Option<OwnedFd>,
        output: OwnedFd,
    },
}

enum Cmd {
    Add(Key, Box<Sess>),
    Input(Key),
    Resize(Key, u16, u16),
    Pause(Key, bool),
    Kill(Key),
    /// The link ended without a CLOSE for the session: keep it, stop reading it.
    Orphan(Key),
    /// Give an orphaned session up (its descriptors leave the epoll set), for another loop.
    Take(Key, crossbeam_channel::Sender<Option<Box<Sess>>>),
    Shutdown,
}

struct Queue {
    cmds: Vec<Cmd>,
    /// The loop's thread has ended: commands are dropped (a `Take`'s answer channel with them).
    closed: bool,
}

struct Shared {
    queue: Mutex<Queue>,
    /// Written (under `queue`'s lock) when `cmds` goes from empty to not empty.
    wake: OwnedFd,
    /// Sessions whose shell exited by itself and whose CLOSE was sent.
    finished: Mutex<Vec<(SessionId, Key)>>,
    next_key: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Only this module's code holds these locks, and it does not panic while holding them.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    /// Queues `cmd` for the loop; `false` if its thread has ended.
    fn send(&self, cmd: Cmd) -> bool {
        let mut q = lock(&self.queue);
        if q.closed {
            return false;
        }
        q.cmds.push(cmd);
        if q.cmds.len() == 1 {
            // Can't fail but for a counter overflow, which a pending wake-up makes moot.
            let _ = rustix::io::write(&self.wake, &1u64.to_ne_bytes());
        }
        true
    }
}

/// The link thread's handle on the loop. Dropping it shuts the loop down (every session is
/// killed, the thread ends once they are reaped).
pub(crate) struct LoopHandle {
    shared: Arc<Shared>,
}

impl LoopHandle {
    /// Starts the loop's thread for the link whose [`Outbox`] is `out`.
    pub(crate) fn start(out: Outbox) -> io::Result<LoopHandle> {
        let ep = epoll::create(epoll::CreateFlags::CLOEXEC)?;
        let wake = eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)?;
        epoll::add(
            &ep,
            &wake,
            epoll::EventData::new_u64(WAKE),
            epoll::EventFlags::IN,
        )?;
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue {
                cmds: Vec::new(),
                closed: false,
            }),
            wake,
            finished: Mutex::new(Vec::new()),
            next_key: AtomicU64::new(1),
        });
        let mut lp = Loop {
            out,
            ep,
            shared: Arc::clone(&shared),
            sessions: HashMap::new(),
            draining: HashSet::new(),
            hup: Vec::new(),
            hup_due: None,
            dying: VecDeque::new(),
            no_pidfd: 0,
            orphans: 0,
            shutdown_at: None,
            buf: vec![0u8; READ_CHUNK],
        };
        std::thread::Builder::new()
            .name("claw-shells".into())
            .spawn(move || lp.run())?;
        Ok(LoopHandle { shared })
    }

    fn send(&self, cmd: Cmd) {
        self.shared.send(cmd);
    }

    /// Hands a spawned shell to the loop; its key. On error the shell is killed and reaped.
    pub(crate) fn add(&self, n: NewSession) -> io::Result<Key> {
        let fail = |e: io::Error| {
            // SAFETY: plain syscall; `n.pid` is our unreaped child, hence its group id.
            unsafe { libc::killpg(n.pid, libc::SIGKILL) };
            if let Some(pid) = Pid::from_raw(n.pid) {
                let _ = rustix::process::waitpid(Some(pid), WaitOptions::empty());
            }
            e
        };
        let (pty, io, stdin) = match n.io {
            Io::Pty(m) => {
                m.set_nonblocking().map_err(fail)?;
                (true, File::from(OwnedFd::from(m)), None)
            }
            Io::Pipes { stdin, output } => {
                let output = File::from(output);
                let stdin = stdin.map(File::from);
                set_nonblocking(&output).map_err(fail)?;
                if let Some(i) = &stdin {
                    set_nonblocking(i).map_err(fail)?;
                }
                (false, output, stdin)
            }
        };
        let pidfd = match Pid::from_raw(n.pid) {
            Some(pid) => match rustix::process::pidfd_open(pid, PidfdFlags::empty()) {
                Ok(fd) => Some(fd),
                // Linux before 5.3: the loop polls for the exit instead.
                Err(rustix::io::Errno::NOSYS) => None,
                Err(e) => return Err(fail(e.into())),
            },
            None => return Err(fail(io::Error::other("spawn returned pid 0"))),
        };
        let key = self.shared.next_key.fetch_add(1, Ordering::Relaxed);
        self.send(Cmd::Add(
            key,
            Box::new(Sess {
                s: n.s,
                pid: n.pid,
                pty,
                master: Some(io),
                registered: epoll::EventFlags::empty(),
                stdin,
                stdin_registered: false,
                pidfd,
                reaped: false,
                input: Some(n.input),
                pending: None,
                paused: false,
                eof: false,
                drain_until: None,
                dying: false,
                kill_sent: false,
                orphaned: false,
                carry: Vec::new(),
                unsent: Vec::new(),
            }),
        ));
        Ok(key)
    }

    /// Continues here a session taken from another loop ([`LoopOrphan::take`]), fed by
    /// `input`; its new key.
    fn adopt(&self, s: SessionId, mut sess: Box<Sess>, input: InputReceiver) -> Key {
        sess.s = s;
        sess.input = Some(input);
        sess.paused = false;
        sess.orphaned = false;
        sess.registered = epoll::EventFlags::empty();
        sess.stdin_registered = false;
        let key = self.shared.next_key.fetch_add(1, Ordering::Relaxed);
        self.send(Cmd::Add(key, sess));
        key
    }

    /// Input was queued for `key`.
    pub(crate) fn input(&self, key: Key) {
        self.send(Cmd::Input(key));
    }

    pub(crate) fn resize(&self, key: Key, cols: u16, rows: u16) {
        self.send(Cmd::Resize(key, cols, rows));
    }

    /// The daemon PAUSEd (`true`) or CONTINUEd (`false`) the session's output.
    pub(crate) fn pause(&self, key: Key, paused: bool) {
        self.send(Cmd::Pause(key, paused));
    }

    /// Hangs the session up (see the module's documentation).
    pub(crate) fn kill(&self, key: Key) {
        self.send(Cmd::Kill(key));
    }

    /// Sessions whose shell exited by itself (CLOSE sent) since the last call.
    fn take_finished(&self) -> Vec<(SessionId, Key)> {
        std::mem::take(&mut *lock(&self.shared.finished))
    }
}

impl Drop for LoopHandle {
    fn drop(&mut self) {
        self.send(Cmd::Shutdown);
    }
}

/// An agent's side of a link's loop: the loop (started with the link's first session) and, per
/// session, its key in the loop and its input queue. [`ShellAgent`](super::ShellAgent) and
/// [`ExecAgent`](super::ExecAgent) differ only in what they start; this is the rest.
#[derive(Default)]
pub(crate) struct LoopSessions {
    lp: Option<LoopHandle>,
    sessions: HashMap<SessionId, (Key, InputSender)>,
}

impl LoopSessions {
    /// The link's loop, started now if this is the link's first session.
    pub(crate) fn start_loop(&mut self, out: &Outbox) -> io::Result<&LoopHandle> {
        if self.lp.is_none() {
            self.lp = Some(LoopHandle::start(out.clone())?);
        }
        self.lp
            .as_ref()
            .ok_or_else(|| io::Error::other("no event loop"))
    }

    /// A session the loop now runs under `key`, fed by `input`.
    pub(crate) fn insert(&mut self, s: SessionId, key: Key, input: InputSender) {
        self.sessions.insert(s, (key, input));
    }

    /// Forgets sessions whose program exited by itself (their CLOSE has been sent).
    pub(crate) fn forget_finished(&mut self) {
        if let Some(lp) = &self.lp {
            for (s, key) in lp.take_finished() {
                if self.sessions.get(&s).is_some_and(|(k, _)| *k == key) {
                    self.sessions.remove(&s);
                }
            }
        }
    }

    /// Ends session `s` (its program is hung up / killed by the loop), if it runs.
    pub(crate) fn end(&mut self, s: SessionId) {
        if let (Some((key, _)), Some(lp)) = (self.sessions.remove(&s), &self.lp) {
            lp.kill(key);
        }
    }

    /// Client input for session `s`.
    pub(crate) fn input(&mut self, s: SessionId, bytes: &[u8]) {
        if let (Some((key, tx)), Some(lp)) = (self.sessions.get_mut(&s), &self.lp) {
            tx.push(bytes);
            lp.input(*key);
        }
    }

    /// Stops (`true`) or restarts reading session `s`'s output.
    pub(crate) fn pause(&self, s: SessionId, paused: bool) {
        if let (Some((key, _)), Some(lp)) = (self.sessions.get(&s), &self.lp) {
            lp.pause(*key, paused);
        }
    }

    /// A new window size for session `s`'s terminal.
    pub(crate) fn resize(&self, s: SessionId, cols: u16, rows: u16) {
        if let (Some((key, _)), Some(lp)) = (self.sessions.get(&s), &self.lp) {
            lp.resize(*key, cols, rows);
        }
    }

    /// The link ended without a CLOSE for `s`: the session is kept, unread, in the loop (which
    /// outlives the link while it holds orphans); the returned [`Orphan`] re-binds it
    /// ([`LoopSessions::rebind`], on any link's loop) or, dropped, ends it as a CLOSE would.
    /// `None` if `s` does not run here (any more).
    pub(crate) fn orphan(&mut self, s: SessionId) -> Option<Orphan> {
        self.forget_finished();
        let (key, _input) = self.sessions.remove(&s)?;
        let lp = self.lp.as_ref()?;
        if !lp.shared.send(Cmd::Orphan(key)) {
            return None;
        }
        let o = LoopOrphan {
            shared: Arc::clone(&lp.shared),
            key,
        };
        Some(Orphan::new(o, LoopOrphan::end))
    }

    /// A REOPEN for `s`, kept as `orphan`: moves the session to this link's loop, where it goes
    /// on (same program, its unread output next, its unwritten input first). `Ok(false)` if
    /// `orphan` is not one of [`LoopSessions::orphan`]'s or its session is gone meanwhile (the
    /// caller starts the session afresh); on error the orphan is ended.
    pub(crate) fn rebind(
        &mut self,
        s: SessionId,
        orphan: Orphan,
        out: &Outbox,
    ) -> io::Result<bool> {
        let o = match orphan.downcast::<LoopOrphan>() {
            Ok(o) => o,
            Err(other) => {
                other.end();
                return Ok(false);
            }
        };
        let lp = match self.start_loop(out) {
            Ok(lp) => lp,
            Err(e) => {
                o.end();
                return Err(e);
            }
        };
        let Some(mut sess) = o.take() else {
            return Ok(false);
        };
        let carry = std::mem::take(&mut sess.carry);
        let (mut tx, rx) = input_queue(s, out);
        if !carry.is_empty() {
            tx.push(&carry);
        }
        let key = lp.adopt(s, sess, rx);
        self.sessions.insert(s, (key, tx));
        Ok(true)
    }

    /// The link is gone: every session ends with the loop (but the orphans, which the loop
    /// keeps until they are re-bound or ended).
    pub(crate) fn link_closed(&mut self) {
        self.sessions.clear();
        self.lp = None;
    }
}

/// An orphaned session of a loop, as the listener's registry keeps it (in an [`Orphan`]).
struct LoopOrphan {
    shared: Arc<Shared>,
    key: Key,
}

impl LoopOrphan {
    /// The grace is over (or an OPEN replaced it, or the listener stops): kill it.
    fn end(self) {
        self.shared.send(Cmd::Kill(self.key));
    }

    /// Takes the session out of its loop (waiting for the loop's answer); `None` if it is gone.
    fn take(self) -> Option<Box<Sess>> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        if !self.shared.send(Cmd::Take(self.key, tx)) {
            return None;
        }
        // The loop answers at its next turn; if its thread ends first, the channel is dropped
        // with the queued command.
        rx.recv().ok().flatten()
    }
}

/// One session in the loop.
struct Sess {
    s: SessionId,
    /// The program: its pid and process group id (and, for a shell, its session id).
    pid: libc::pid_t,
    /// A shell in a PTY ([`Io::Pty`]), else a process on pipes.
    pty: bool,
    /// The PTY master, or the output pipe. `None` once the session is over (finished or
    /// killed): the terminal is hung up / the pipe closed.
    master: Option<File>,
    /// What the master is registered for in the epoll set (empty: not registered).
    registered: epoll::EventFlags,
    /// On pipes: the process's stdin (input goes there, not to `master`).
    stdin: Option<File>,
    stdin_registered: bool,
    /// Readable once the shell has exited; `None` once reaped, or without pidfd support.
    pidfd: Option<OwnedFd>,
    reaped: bool,
    input: Option<InputReceiver>,
    /// A chunk of input partly written to the master, and how much of it.
    pending: Option<(Vec<u8>, usize)>,
    /// The daemon has PAUSEd the session's output.
    paused: bool,
    /// The master reads EOF/EIO: every process has closed the terminal.
    eof: bool,
    /// The shell exited: the session closes when nothing arrived until then.
    drain_until: Option<Instant>,
    /// Killed (hung up): waiting for the reap and for [`KILL_GRACE`].
    dying: bool,
    /// The SIGKILL pass for this session is done.
    kill_sent: bool,
    /// Its link ended without a CLOSE: kept, not read, for a REOPEN (see the module's
    /// documentation). Cleared by a kill.
    orphaned: bool,
    /// Input received on the old link and not yet written (orphaned): goes first on the next.
    carry: Vec<u8>,
    /// Output read after the link had gone (before the session was orphaned): sent first on
    /// the next link.
    unsent: Vec<u8>,
}

impl Sess {
    /// How long after the exit the session waits for more output (see [`Io`]).
    fn drain(&self) -> Duration {
        if self.pty {
            DRAIN
        } else {
            EXEC_DRAIN
        }
    }
}

fn token_master(key: Key) -> u64 {
    key << 2
}

fn token_pidfd(key: Key) -> u64 {
    (key << 2) | 1
}

fn token_stdin(key: Key) -> u64 {
    (key << 2) | 2
}

fn set_nonblocking(f: &File) -> io::Result<()> {
    let flags = rustix::fs::fcntl_getfl(f)?;
    rustix::fs::fcntl_setfl(f, flags | rustix::fs::OFlags::NONBLOCK)?;
    Ok(())
}

/// The loop's state (on its own thread).
struct Loop {
    out: Outbox,
    ep: OwnedFd,
    shared: Arc<Shared>,
    sessions: HashMap<Key, Sess>,
    /// Sessions with a `drain_until`.
    draining: HashSet<Key>,
    /// Killed sessions whose terminal sessions still get their /proc pass of SIGHUP/SIGCONT.
    hup: Vec<libc::pid_t>,
    hup_due: Option<Instant>,
    /// Killed sessions in kill order (so by deadline): (SIGKILL deadline, key).
    dying: VecDeque<(Instant, Key)>,
    /// Sessions without a pidfd and not yet reaped.
    no_pidfd: usize,
    /// Orphaned sessions (not killed).
    orphans: usize,
    /// The link is gone (the time, or that of the last kill since): the loop ends once it has
    /// no session left, or, holding no orphan, [`SHUTDOWN_LIMIT`] after this.
    shutdown_at: Option<Instant>,
    buf: Vec<u8>,
}

impl Loop {
    fn run(&mut self) {
        let mut events: Vec<epoll::Event> = Vec::with_capacity(256);
        loop {
            let now = Instant::now();
            let timeout = self.next_deadline().map(|d| {
                let t = d.saturating_duration_since(now) + Duration::from_millis(1);
                Timespec {
                    tv_sec: t.as_secs() as _,
                    tv_nsec: t.subsec_nanos() as _,
                }
            });
            events.clear();
            match epoll::wait(
                &self.ep,
                rustix::buffer::spare_capacity(&mut events),
                timeout.as_ref(),
            ) {
                Ok(_) => {}
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => {
                    tracing::error!(error = %e, "shell: epoll_wait failed; hanging every session up");
                    self.kill_all(true);
                    self.reap_all_blocking();
                    return;
                }
            }
            self.run_commands();
            for ev in &events {
                let token = ev.data.u64();
                if token == WAKE {
                    let mut b = [0u8; 8];
                    let _ = rustix::io::read(&self.shared.wake, &mut b);
                    continue;
                }
                let key = token >> 2;
                if token & 3 == 1 {
                    self.on_exit(key);
                } else if token & 3 == 2 {
                    self.flush_input(key);
                } else {
                    let f = ev.flags;
                    let hup = f.intersects(epoll::EventFlags::HUP | epoll::EventFlags::ERR);
                    if f.contains(epoll::EventFlags::OUT) || hup {
                        self.flush_input(key);
                    }
                    if f.contains(epoll::EventFlags::IN) || hup {
                        self.on_readable(key, hup);
                    }
                }
            }
            // Commands that came in meanwhile (the eventfd stays readable for them anyway).
            self.run_commands();
            self.timers(Instant::now());
            if let Some(t) = self.shutdown_at {
                if self.sessions.is_empty() {
                    return;
                }
                if self.orphans == 0 && t.elapsed() > SHUTDOWN_LIMIT {
                    tracing::warn!(
                        left = self.sessions.len(),
                        "shell: shells of a closed link not reaped in time; leaving them"
                    );
                    return;
                }
            }
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        let mut d: Option<Instant> = None;
        let mut at = |t: Instant| d = Some(d.map_or(t, |d| d.min(t)));
        for k in &self.draining {
            if let Some(t) = self.sessions.get(k).and_then(|x| x.drain_until) {
                at(t);
            }
        }
        if let Some(t) = self.hup_due {
            at(t);
        }
        if let Some((t, _)) = self.dying.front() {
            at(*t + KILL_BATCH);
        }
        if self.no_pidfd > 0 || self.reaping() {
            at(Instant::now() + NO_PIDFD_TICK);
        }
        d
    }

    /// The link is gone and sessions other than orphans are left (to be reaped).
    fn reaping(&self) -> bool {
        self.shutdown_at.is_some() && self.sessions.len() > self.orphans
    }

    fn run_commands(&mut self) {
        let cmds = std::mem::take(&mut lock(&self.shared.queue).cmds);
        for cmd in cmds {
            match cmd {
                Cmd::Add(key, sess) => self.add(key, *sess),
                Cmd::Input(key) => self.flush_input(key),
                Cmd::Resize(key, cols, rows) => {
                    let pty = self.sessions.get(&key).filter(|x| x.pty);
                    if let Some(m) = pty.and_then(|x| x.master.as_ref()) {
                        if let Err(e) = pty::set_winsize(m.as_fd(), cols, rows) {
                            tracing::debug!(error = %e, "shell: resize failed");
                        }
                    }
                }
                Cmd::Pause(key, paused) => {
                    let Some(x) = self.sessions.get_mut(&key) else {
                        continue;
                    };
                    if x.paused == paused {
                        continue;
                    }
                    x.paused = paused;
                    if paused {
                        // No closing while paused: the drain resumes on CONTINUE.
                        x.drain_until = None;
                        self.draining.remove(&key);
                    } else if x.reaped && x.master.is_some() && !x.dying {
                        x.drain_until = Some(Instant::now() + x.drain());
                        self.draining.insert(key);
                    }
                    self.update_interest(key);
                }
                Cmd::Kill(key) => self.kill(key),
                Cmd::Orphan(key) => self.orphan(key),
                Cmd::Take(key, answer) => {
                    let _ = answer.send(self.take(key));
                }
                Cmd::Shutdown => {
                    self.shutdown_at.get_or_insert_with(Instant::now);
                    self.kill_all(false);
                }
            }
        }
    }

    /// A new session, or one re-bound from another loop ([`LoopHandle::adopt`]), which may have
    /// exited meanwhile (reaped, its output still unread).
    fn add(&mut self, key: Key, mut sess: Sess) {
        if !sess.unsent.is_empty() {
            // Read from the program after its old link had gone: before anything read now.
            if self.out.data(sess.s, &sess.unsent).is_ok() {
                sess.unsent = Vec::new();
            } else {
                sess.paused = true;
            }
        }
        if let Some(fd) = &sess.pidfd {
            if let Err(e) = epoll::add(
                &self.ep,
                fd,
                epoll::EventData::new_u64(token_pidfd(key)),
                epoll::EventFlags::IN,
            ) {
                tracing::warn!(session = sess.s, error = %e, "shell: cannot watch the shell's pidfd");
            }
        } else if !sess.reaped {
            self.no_pidfd += 1;
        }
        let (reaped, eof) = (sess.reaped, sess.eof);
        self.sessions.insert(key, sess);
        self.update_interest(key);
        if self.shutdown_at.is_some() {
            self.kill(key);
            return;
        }
        if reaped {
            if eof {
                self.finish(key);
                return;
            }
            if let Some(x) = self.sessions.get_mut(&key) {
                x.drain_until = Some(Instant::now() + x.drain());
                self.draining.insert(key);
            }
        }
        // Input carried over from the session's previous link.
        self.flush_input(key);
    }

    /// The link ended without a CLOSE for the session: stop reading it (its program blocks on
    /// a full terminal or pipe: nothing is lost), keep its unwritten input for the next link.
    fn orphan(&mut self, key: Key) {
        let Some(x) = self.sessions.get_mut(&key) else {
            return; // finished meanwhile
        };
        if x.dying || x.orphaned {
            return;
        }
        x.orphaned = true;
        x.paused = true;
        x.drain_until = None;
        if let Some((chunk, at)) = x.pending.take() {
            x.carry
                .extend_from_slice(chunk.get(at..).unwrap_or_default());
        }
        if let Some(input) = x.input.take() {
            while let Ok(chunk) = input.channel().try_recv() {
                x.carry.extend_from_slice(&chunk);
            }
        }
        tracing::debug!(
            session = x.s,
            pid = x.pid,
            carry = x.carry.len(),
            "orphaned: kept for a REOPEN"
        );
        self.orphans += 1;
        self.draining.remove(&key);
        self.update_interest(key);
    }

    /// Gives an orphaned session up for another loop: its descriptors leave this epoll set.
    fn take(&mut self, key: Key) -> Option<Box<Sess>> {
        if !self
            .sessions
            .get(&key)
            .is_some_and(|x| x.orphaned && !x.dying)
        {
            return None;
        }
        let mut x = self.sessions.remove(&key)?;
        self.orphans = self.orphans.saturating_sub(1);
        self.draining.remove(&key);
        if let Some(m) = &x.master {
            if !x.registered.is_empty() {
                let _ = epoll::delete(&self.ep, m);
            }
        }
        x.registered = epoll::EventFlags::empty();
        if let Some(i) = &x.stdin {
            if x.stdin_registered {
                let _ = epoll::delete(&self.ep, i);
            }
        }
        x.stdin_registered = false;
        match &x.pidfd {
            Some(fd) => {
                let _ = epoll::delete(&self.ep, fd);
            }
            None if !x.reaped => self.no_pidfd = self.no_pidfd.saturating_sub(1),
            None => {}
        }
        tracing::debug!(
            session = x.s,
            pid = x.pid,
            "orphan handed over to a new link"
        );
        Some(Box::new(x))
    }

    /// Registers the master for what the session now waits for.
    fn update_interest(&mut self, key: Key) {
        let Some(x) = self.sessions.get_mut(&key) else {
            return;
        };
        let Some(m) = &x.master else {
            return;
        };
        let mut want = epoll::EventFlags::empty();
        if !x.paused && !x.eof {
            want |= epoll::EventFlags::IN;
        }
        if x.pty && x.pending.is_some() && !x.eof {
            want |= epoll::EventFlags::OUT;
        }
        if let Some(i) = &x.stdin {
            let want_out = x.pending.is_some();
            if want_out != x.stdin_registered {
                let data = epoll::EventData::new_u64(token_stdin(key));
                let r = if want_out {
                    epoll::add(&self.ep, i, data, epoll::EventFlags::OUT)
                } else {
                    epoll::delete(&self.ep, i)
                };
                match r {
                    Ok(()) => x.stdin_registered = want_out,
                    Err(e) => tracing::warn!(session = x.s, error = %e, "epoll_ctl failed"),
                }
            }
        }
        if want == x.registered {
            return;
        }
        let data = epoll::EventData::new_u64(token_master(key));
        let r = if want.is_empty() {
            epoll::delete(&self.ep, m)
        } else if x.registered.is_empty() {
            epoll::add(&self.ep, m, data, want)
        } else {
            epoll::modify(&self.ep, m, data, want)
        };
        match r {
            Ok(()) => x.registered = want,
            Err(e) => tracing::warn!(session = x.s, error = %e, "epoll_ctl failed"),
        }
    }

    /// Closes the master (hanging the terminal up) and the input queue.
    fn hang_up(&mut self, key: Key) {
        let Some(x) = self.sessions.get_mut(&key) else {
            return;
        };
        if let Some(m) = x.master.take() {
            if !x.registered.is_empty() {
                let _ = epoll::delete(&self.ep, &m);
            }
            x.registered = epoll::EventFlags::empty();
        }
        if let Some(i) = x.stdin.take() {
            if x.stdin_registered {
                let _ = epoll::delete(&self.ep, &i);
            }
            x.stdin_registered = false;
        }
        x.input = None;
        x.pending = None;
        x.drain_until = None;
        self.draining.remove(&key);
    }

    fn on_readable(&mut self, key: Key, hup: bool) {
        let Some(x) = self.sessions.get_mut(&key) else {
            return;
        };
        if x.paused || x.eof {
            return;
        }
        let Some(m) = &x.master else {
            return;
        };
        let mut eof = false;
        match (&*m).read(&mut self.buf) {
            Ok(0) => eof = true,
            Ok(n) => {
                if self.out.data(x.s, &self.buf[..n]).is_err() {
                    // The link is gone; the link thread is about to orphan the session or shut
                    // this loop down. Keep what was read for the next link, read no more.
                    x.unsent.extend_from_slice(&self.buf[..n]);
                    x.paused = true;
                    x.drain_until = None;
                    self.draining.remove(&key);
                    self.update_interest(key);
                    return;
                }
                if x.pty && x.drain_until.is_some() {
                    x.drain_until = Some(Instant::now() + DRAIN);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => eof = hup,
            // EIO: every process has closed the terminal.
            Err(_) => eof = true,
        }
        if eof {
            x.eof = true;
            if x.pty {
                x.input = None; // nothing can be typed any more
                x.pending = None;
            }
            self.update_interest(key);
            if self.sessions.get(&key).is_some_and(|x| x.reaped) {
                self.finish(key);
            }
        }
    }

    /// Writes queued input to the master until it would block.
    fn flush_input(&mut self, key: Key) {
        let Some(x) = self.sessions.get_mut(&key) else {
            return;
        };
        let sink = if x.pty { &x.master } else { &x.stdin };
        let (Some(m), Some(input)) = (sink, &x.input) else {
            return;
        };
        if x.pty && x.eof {
            return;
        }
        let mut gone = false;
        loop {
            if x.pending.is_none() {
                match input.channel().try_recv() {
                    Ok(chunk) => x.pending = Some((chunk, 0)),
                    Err(_) => break,
                }
            }
            let Some((chunk, at)) = &mut x.pending else {
                break;
            };
            match (&*m).write(&chunk[*at..]) {
                Ok(n) if n > 0 => {
                    *at += n;
                    if *at >= chunk.len() {
                        input.done(chunk.len());
                        x.pending = None;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                // EIO: the terminal is gone.
                _ => {
                    gone = true;
                    break;
                }
            }
        }
        if gone {
            if let Some((chunk, _)) = x.pending.take() {
                input.done(chunk.len());
            }
            x.input = None;
            if !x.pty {
                // The process closed its stdin: so do we.
                if let Some(i) = x.stdin.take() {
                    if x.stdin_registered {
                        let _ = epoll::delete(&self.ep, &i);
                    }
                    x.stdin_registered = false;
                }
            }
        }
        self.update_interest(key);
    }

    /// The shell's pidfd is readable (or, without pidfds, a poll): reap it if it exited.
    fn on_exit(&mut self, key: Key) {
        let Some(x) = self.sessions.get_mut(&key) else {
            return;
        };
        if x.reaped {
            return;
        }
        let Some(pid) = Pid::from_raw(x.pid) else {
            return;
        };
        let status = match rustix::process::waitpid(Some(pid), WaitOptions::NOHANG) {
            Ok(None) => return, // not yet (a poll without pidfd)
            Ok(Some((_, status))) => Some(status),
            Err(rustix::io::Errno::INTR) => return,
            // ECHILD: someone else reaped it.
            Err(_) => None,
        };
        tracing::debug!(session = x.s, ?status, "shell: exited");
        x.reaped = true;
        match x.pidfd.take() {
            Some(fd) => {
                let _ = epoll::delete(&self.ep, &fd);
            }
            None => self.no_pidfd = self.no_pidfd.saturating_sub(1),
        }
        if x.dying {
            if x.kill_sent {
                self.sessions.remove(&key);
            }
            return;
        }
        if x.orphaned {
            // Its output waits for the next link, which closes the session after it.
            return;
        }
        if x.eof {
            self.finish(key);
        } else if !x.paused {
            x.drain_until = Some(Instant::now() + x.drain());
            self.draining.insert(key);
        }
    }

    /// The shell exited and its output is sent: CLOSE, hang the terminal up, forget it.
    fn finish(&mut self, key: Key) {
        self.hang_up(key);
        if let Some(x) = self.sessions.remove(&key) {
            if x.pidfd.is_none() && !x.reaped {
                self.no_pidfd = self.no_pidfd.saturating_sub(1);
            }
            let _ = self.out.close(x.s, super::CloseReason::Normal);
            lock(&self.shared.finished).push((x.s, key));
        }
    }

    fn kill(&mut self, key: Key) {
        if self.sessions.get(&key).is_none_or(|x| x.dying) {
            return;
        }
        if let Some(t) = &mut self.shutdown_at {
            // The link is long gone, maybe (an orphan's grace ran out): reaping starts now.
            *t = Instant::now();
        }
        if let Some(x) = self.sessions.get_mut(&key) {
            if x.orphaned {
                x.orphaned = false;
                self.orphans = self.orphans.saturating_sub(1);
                tracing::debug!(session = x.s, pid = x.pid, "orphan ended");
            }
        }
        self.hang_up(key);
        let Some(x) = self.sessions.get_mut(&key) else {
            return;
        };
        if x.reaped {
            // Exited by itself: whatever it left running was hung up with the terminal.
            self.sessions.remove(&key);
            return;
        }
        x.dying = true;
        let now = Instant::now();
        if let Some(pid) = Pid::from_raw(x.pid) {
            // Errors (ESRCH: already gone) are ignored.
            if x.pty {
                // The shell's process group now; the rest of its terminal session in the
                // next /proc pass.
                let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::HUP);
                let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::CONT);
                self.hup.push(x.pid);
                self.hup_due.get_or_insert(now + HUP_BATCH);
            } else {
                let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::TERM);
            }
        }
        self.dying.push_back((now + KILL_GRACE, key));
    }

    /// Kills every session, or every one but the orphans.
    fn kill_all(&mut self, orphans_too: bool) {
        let keys: Vec<Key> = self
            .sessions
            .iter()
            .filter(|(_, x)| orphans_too || !x.orphaned)
            .map(|(k, _)| *k)
            .collect();
        for k in keys {
            self.kill(k);
        }
    }

    fn timers(&mut self, now: Instant) {
        if !self.draining.is_empty() {
            let due: Vec<Key> = self
                .draining
                .iter()
                .copied()
                .filter(|k| {
                    self.sessions
                        .get(k)
                        .and_then(|x| x.drain_until)
                        .is_none_or(|t| t <= now)
                })
                .collect();
            for k in due {
                self.draining.remove(&k);
                if self
                    .sessions
                    .get(&k)
                    .is_some_and(|x| x.drain_until.is_some())
                {
                    self.finish(k);
                }
            }
        }
        if self.hup_due.is_some_and(|t| t <= now) {
            self.hup_due = None;
            let sids: Vec<(libc::pid_t, bool)> =
                self.hup.drain(..).map(|pid| (pid, false)).collect();
            pty::signal_sessions(&sids, &[libc::SIGHUP, libc::SIGCONT]);
        }
        if self.dying.front().is_some_and(|(t, _)| *t <= now) {
            let mut batch = Vec::new();
            while let Some(&(t, key)) = self.dying.front() {
                if t > now {
                    break;
                }
                self.dying.pop_front();
                if let Some(x) = self.sessions.get_mut(&key) {
                    x.kill_sent = true;
                    if x.pty {
                        batch.push((x.pid, !x.reaped));
                    } else if !x.reaped {
                        if let Some(pid) = Pid::from_raw(x.pid) {
                            // Its process group only (an unreaped leader: the id is ours).
                            let _ = rustix::process::kill_process_group(
                                pid,
                                rustix::process::Signal::KILL,
                            );
                        }
                    }
                    if x.reaped {
                        self.sessions.remove(&key);
                    }
                }
            }
            pty::signal_sessions(&batch, &[libc::SIGKILL]);
        }
        if self.no_pidfd > 0 || self.reaping() {
            let keys: Vec<Key> = self
                .sessions
                .iter()
                .filter(|(_, x)| x.pidfd.is_none() && !x.reaped)
                .map(|(k, _)| *k)
                .collect();
            for k in keys {
                self.on_exit(k);
            }
        }
    }

    /// Last resort (the epoll set failed): SIGKILL every unreaped shell and wait for it.
    fn reap_all_blocking(&mut self) {
        for (_, x) in self.sessions.drain() {
            if x.reaped {
                continue;
            }
            if x.pty {
                pty::signal_sessions(&[(x.pid, true)], &[libc::SIGKILL]);
            } else if let Some(pid) = Pid::from_raw(x.pid) {
                let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
            }
            if let Some(pid) = Pid::from_raw(x.pid) {
                let _ = rustix::process::waitpid(Some(pid), WaitOptions::empty());
            }
        }
    }
}

impl Drop for Loop {
    /// The thread ends (or unwinds): later commands are refused, queued ones dropped, so that
    /// nobody waits for an answer ([`LoopOrphan::take`]) that would never come.
    fn drop(&mut self) {
        let mut q = lock(&self.shared.queue);
        q.closed = true;
        q.cmds.clear();
    }
}
