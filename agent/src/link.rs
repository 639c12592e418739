//! One pod link: the HELLO exchange, the read/dispatch loop, and the [`Outbox`].

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};

use super::input::{INPUT_HARD_LIMIT, INPUT_HIGH};
use super::orphans::Orphans;
use super::{Agent, Export, OpenInfo, SessionId, AGENT_NAME};
use clawterm_core::podlink::codec::{VERSION, VERSION_MIGRATE};
use clawterm_core::podlink::{decode, encode, CloseReason, Decoded, Msg, MAX_BODY};

/// How long the daemon has to send its HELLO after connecting.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The writer coalesces queued messages into writes of about this size.
const WRITE_BATCH: usize = 256 * 1024;
/// Read chunk size.
const READ_CHUNK: usize = 64 * 1024;
/// Largest agent state the SDK collects for a session that moves in (the daemon's own limit
/// for a move is the same); beyond it the session is closed with an error.
pub const MAX_IMPORT_STATE: usize = 64 << 20;
/// Output an agent sends for a session after it was exported, held in case the move is called
/// off; beyond this it is dropped (with a warning), since an exported session should be quiet.
const EXPORTED_HOLD_LIMIT: usize = 4 << 20;

enum WriterCmd {
    Bytes(Vec<u8>),
    /// Flush what is queued, then end.
    Stop,
}

#[derive(Default)]
struct Sess {
    /// The daemon sent PAUSE (and no CONTINUE yet).
    paused: bool,
    /// We closed it while paused: the CLOSE waits in `held`; nothing more is accepted.
    closing: bool,
    /// Encoded messages held while paused.
    held: Vec<Vec<u8>>,
    /// Bytes in `held`.
    held_bytes: usize,
    /// The agent asked to stop this session's input ([`Outbox::pause_input`]).
    input_held_by_agent: bool,
    /// Output held for a paused session passed [`HELD_INPUT_PAUSE`]: input stops too, since an
    /// agent answering input (an echo, a REPL) would otherwise hold output without bound.
    input_held_by_output: bool,
    /// What we last told the daemon: PAUSE sent (and no CONTINUE since).
    input_pause_sent: bool,
    /// Opened by REOPEN, and no DATA delivered since: STATE may follow (a session that moved
    /// in, POD-LINK.md §8).
    may_import: bool,
    /// The STATE chunks received so far, from the first STATE after the REOPEN until the empty
    /// one (then [`Agent::import`]).
    importing: Option<Vec<u8>>,
    /// DATA that arrived while `importing`, delivered after the import, and its size.
    import_queue: VecDeque<Vec<u8>>,
    import_queued: usize,
    /// `import_queue` passed [`INPUT_HIGH`]: the session's input is paused until the import.
    input_held_by_import: bool,
    /// EXPORT was answered: nothing more goes out for the session (what is sent is held) until
    /// CONTINUE (the move was called off) or CLOSE (it moved).
    exported: bool,
}

impl Sess {
    /// Output for the session is held, not sent: the daemon PAUSEd it, or it was exported.
    fn holds(&self) -> bool {
        self.paused || self.exported
    }

    fn hold(&mut self, buf: Vec<u8>, closing: bool) {
        if self.exported && !closing && self.held_bytes + buf.len() > EXPORTED_HOLD_LIMIT {
            tracing::warn!(
                bytes = buf.len(),
                "output for a session that was exported (it is moving to another node) is over {} MiB; dropped",
                EXPORTED_HOLD_LIMIT >> 20
            );
            return;
        }
        self.held_bytes += buf.len();
        self.held.push(buf);
        self.closing = closing;
        if self.held_bytes > HELD_INPUT_PAUSE {
            self.input_held_by_output = true;
        }
    }

    /// The PAUSE or CONTINUE for this session's input that the daemon must now be sent, if
    /// the wanted state changed (POD-LINK.md §4: pod → daemon PAUSE stops the client's input).
    fn input_flow(&mut self) -> Option<Msg<'static>> {
        let want =
            self.input_held_by_agent || self.input_held_by_output || self.input_held_by_import;
        // Nothing goes out for an exported session (the daemon holds its input anyway).
        if self.closing || self.exported || want == self.input_pause_sent {
            return None;
        }
        self.input_pause_sent = want;
        Some(if want { Msg::Pause } else { Msg::Continue })
    }
}

/// Output held for a session the daemon has paused beyond which the SDK also PAUSEs that
/// session's input; CONTINUE follows once the daemon's CONTINUE has flushed what was held.
pub const HELD_INPUT_PAUSE: usize = 256 * 1024;

struct State {
    link_open: bool,
    sessions: HashMap<SessionId, Sess>,
    /// The link thread (this id) is dispatching what one read returned: its output is
    /// collected in `batch` and goes out as one write when the dispatch ends (see
    /// [`Shared::end_batch`]). Other threads' output goes to the writer thread as before,
    /// after whatever the batch holds.
    batching: Option<std::thread::ThreadId>,
    /// Output collected while `batching`, in call order.
    batch: Vec<u8>,
}

struct Shared {
    state: Mutex<State>,
    cond: Condvar,
    tx: Sender<WriterCmd>,
    /// Bytes handed to the writer thread and not yet written to the socket.
    queued: std::sync::atomic::AtomicUsize,
    /// The socket, for the link thread's own non-blocking writes of a batch when the writer
    /// thread has nothing queued.
    sock: UnixStream,
}

/// A batch this large goes to the writer thread at once instead of waiting for the end of the
/// dispatch.
const BATCH_LIMIT: usize = 64 * 1024;

/// Producers block once this much output waits for the socket: a PAUSE from the daemon then
/// finds little in flight, and a fast producer cannot queue unbounded memory.
const QUEUE_LIMIT: usize = 256 * 1024;

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // The lock is only held by SDK code that does not panic; recover if it ever was.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `bytes` for the socket after everything queued before: into the current batch
    /// while the link thread is dispatching, to the writer thread otherwise. Called with the
    /// state locked, so the order of calls is the order on the socket.
    fn enqueue(&self, st: &mut State, bytes: Vec<u8>) -> Result<(), ()> {
        if st.batching.is_some() && st.batching == Some(std::thread::current().id()) {
            if st.batch.is_empty() {
                st.batch = bytes;
            } else {
                st.batch.extend_from_slice(&bytes);
            }
            if st.batch.len() >= BATCH_LIMIT {
                return self.batch_to_writer(st);
            }
            return Ok(());
        }
        self.batch_to_writer(st)?;
        self.to_writer(bytes)
    }

    fn to_writer(&self, bytes: Vec<u8>) -> Result<(), ()> {
        self.queued
            .fetch_add(bytes.len(), std::sync::atomic::Ordering::Relaxed);
        self.tx.send(WriterCmd::Bytes(bytes)).map_err(|_| ())
    }

    /// Hands the current batch to the writer thread (state locked).
    fn batch_to_writer(&self, st: &mut State) -> Result<(), ()> {
        if st.batch.is_empty() {
            return Ok(());
        }
        let b = std::mem::take(&mut st.batch);
        self.to_writer(b)
    }

    /// The link thread starts dispatching one read's worth of messages.
    fn begin_batch(&self) {
        self.lock().batching = Some(std::thread::current().id());
    }

    /// The dispatch ended: the batch goes out. When the writer thread has nothing queued (so
    /// nothing can be ahead of the batch), the link thread writes it itself without blocking,
    /// which saves waking the writer thread; what the socket does not take goes to the writer.
    fn end_batch(&self) {
        let mut st = self.lock();
        st.batching = None;
        if st.batch.is_empty() {
            return;
        }
        let mut b = std::mem::take(&mut st.batch);
        if self.queued.load(std::sync::atomic::Ordering::Relaxed) == 0 {
            let n = send_nonblocking(&self.sock, &b);
            if n == b.len() {
                b.clear();
                st.batch = b; // keep the allocation for the next batch
                return;
            }
            b.drain(..n);
        }
        let _ = self.to_writer(b);
    }

    /// Sends the PAUSE or CONTINUE for `s`'s input that its state now calls for (state
    /// locked). Control messages are never held: only DATA waits for the daemon's CONTINUE.
    fn input_flow(&self, st: &mut State, s: SessionId) {
        if let Some(m) = st.sessions.get_mut(&s).and_then(|x| x.input_flow()) {
            let mut b = Vec::with_capacity(9);
            encode(&mut b, s, &m);
            let _ = self.enqueue(st, b);
        }
    }

    fn mark_link_closed(&self) {
        let mut st = self.lock();
        st.link_open = false;
        st.sessions.clear();
        drop(st);
        self.cond.notify_all();
    }
}

/// Writes what the socket takes now (MSG_DONTWAIT: never blocks, whatever the socket's mode);
/// returns how many bytes were written (0 on any error: the writer thread, which gets the rest,
/// then sees the error and closes the link).
fn send_nonblocking(sock: &UnixStream, bytes: &[u8]) -> usize {
    use std::os::fd::AsRawFd;
    let mut off = 0;
    while off < bytes.len() {
        // SAFETY: `bytes[off..]` is a live, initialised slice of the given length; the fd
        // belongs to `sock`, which outlives the call.
        let n = unsafe {
            libc::send(
                sock.as_raw_fd(),
                bytes[off..].as_ptr().cast(),
                bytes.len() - off,
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        if n > 0 {
            off += n as usize;
        } else if n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
            continue;
        } else {
            break;
        }
    }
    off
}

fn not_connected() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "pod link is closed")
}

/// Sends messages to the daemon on one link. Cheap to clone; `Send + Sync`, so any thread can
/// hold one (e.g. a reader of a child process's output).
///
/// Sends for a session that is not open on the link (never opened, or closed by either side)
/// are dropped silently and return `Ok(())`; once the link itself is gone every call returns
/// an error of kind `NotConnected`, which a producer thread can use as its signal to stop.
#[derive(Clone)]
pub struct Outbox {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox").finish_non_exhaustive()
    }
}

impl Outbox {
    fn send_or_hold(&self, s: SessionId, buf: Vec<u8>, closing: bool) -> io::Result<()> {
        let mut st = self.shared.lock();
        if !st.link_open {
            return Err(not_connected());
        }
        let Some(sess) = st.sessions.get_mut(&s) else {
            return Ok(());
        };
        if sess.closing {
            return Ok(());
        }
        if sess.holds() {
            sess.hold(buf, closing);
            self.shared.input_flow(&mut st, s);
            return Ok(());
        }
        // Back-pressure: wait while the socket is behind (the writer notifies as it drains).
        use std::sync::atomic::Ordering::Relaxed;
        if !closing && self.shared.queued.load(Relaxed) > QUEUE_LIMIT {
            // What this dispatch collected must reach the writer first, or the wait below
            // could outlast it.
            let _ = self.shared.batch_to_writer(&mut st);
        }
        while !closing && self.shared.queued.load(Relaxed) > QUEUE_LIMIT && st.link_open {
            st = self
                .shared
                .cond
                .wait_timeout(st, std::time::Duration::from_millis(10))
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
        if !st.link_open {
            return Err(not_connected());
        }
        if st.sessions.get(&s).is_none_or(|x| x.closing) {
            return Ok(());
        }
        if st.sessions.get(&s).is_some_and(|x| x.holds()) {
            if let Some(sess) = st.sessions.get_mut(&s) {
                sess.hold(buf, closing);
            }
            self.shared.input_flow(&mut st, s);
            return Ok(());
        }
        if closing {
            st.sessions.remove(&s);
        }
        // Queued under the lock so that order matches the order of calls and a CLOSE can't
        // overtake DATA sent before it.
        let r = self.shared.enqueue(&mut st, buf);
        drop(st);
        if closing {
            self.shared.cond.notify_all();
        }
        r.map_err(|_| not_connected())
    }

    /// Sends `bytes` as DATA for session `s` (split into several messages if over 1 MiB; an
    /// empty slice sends one empty DATA). Held, not sent, while the daemon has the session
    /// paused; flushed on CONTINUE.
    pub fn data(&self, s: SessionId, bytes: &[u8]) -> io::Result<()> {
        if !bytes.is_empty() && bytes.len() <= MAX_BODY {
            // Fast path (the link thread answering during a dispatch): encoded straight into
            // the batch, no allocation of its own.
            let mut st = self.shared.lock();
            let sendable = st.link_open
                && st.batching.is_some()
                && st.batching == Some(std::thread::current().id())
                && st.batch.len() < BATCH_LIMIT
                && st
                    .sessions
                    .get(&s)
                    .is_some_and(|x| !x.holds() && !x.closing);
            if sendable {
                encode(&mut st.batch, s, &Msg::Data(bytes));
                return Ok(());
            }
        }
        let mut buf = Vec::with_capacity(bytes.len() + 9 * (1 + bytes.len() / MAX_BODY));
        if bytes.is_empty() {
            encode(&mut buf, s, &Msg::Data(bytes));
        }
        for chunk in bytes.chunks(MAX_BODY) {
            encode(&mut buf, s, &Msg::Data(chunk));
        }
        self.send_or_hold(s, buf, false)
    }

    /// Closes session `s` (CLOSE with `reason`). Nothing more is sent for it afterwards; the
    /// agent gets no further events for it. If the session is paused, the CLOSE follows the
    /// held DATA on CONTINUE (so no output is lost).
    pub fn close(&self, s: SessionId, reason: CloseReason) -> io::Result<()> {
        let mut buf = Vec::with_capacity(10);
        encode(&mut buf, s, &Msg::Close(reason));
        self.send_or_hold(s, buf, true)
    }

    /// Asks the daemon to stop sending input for `s` (PAUSE, pod → daemon; POD-LINK.md §4):
    /// it stops reading that client, whose TCP then pushes back on it, until
    /// [`Outbox::resume_input`]. Other sessions of the link are not affected. Input already in
    /// flight still arrives (a few hundred KiB at most), so keep a queue that tolerates it —
    /// [`input_queue`](super::input_queue) does all of this for you. Idempotent.
    pub fn pause_input(&self, s: SessionId) -> io::Result<()> {
        self.set_input_held(s, true)
    }

    /// Lets the daemon send input for `s` again (CONTINUE), after [`Outbox::pause_input`].
    pub fn resume_input(&self, s: SessionId) -> io::Result<()> {
        self.set_input_held(s, false)
    }

    fn set_input_held(&self, s: SessionId, held: bool) -> io::Result<()> {
        let mut st = self.shared.lock();
        if !st.link_open {
            return Err(not_connected());
        }
        if let Some(x) = st.sessions.get_mut(&s) {
            x.input_held_by_agent = held;
            self.shared.input_flow(&mut st, s);
        }
        Ok(())
    }

    /// Whether `s`'s input is paused (by [`Outbox::pause_input`], or because output held for
    /// it while the daemon has it paused passed [`HELD_INPUT_PAUSE`]).
    pub fn is_input_paused(&self, s: SessionId) -> bool {
        self.shared
            .lock()
            .sessions
            .get(&s)
            .is_some_and(|x| x.input_pause_sent)
    }

    /// Whether `s` is open on this link (opened, and closed by neither side).
    pub fn is_open(&self, s: SessionId) -> bool {
        let st = self.shared.lock();
        st.link_open && st.sessions.get(&s).is_some_and(|x| !x.closing)
    }

    /// Whether the daemon has paused `s` (PAUSE without CONTINUE yet), or `s` was exported
    /// (it is moving to another node): DATA sent for it now is held.
    pub fn is_paused(&self, s: SessionId) -> bool {
        self.shared
            .lock()
            .sessions
            .get(&s)
            .is_some_and(|x| x.holds())
    }

    /// Blocks while the daemon has `s` paused (or `s` was exported and its move is not over).
    /// Returns `true` when DATA may be sent, `false` once the session or the link is closed.
    /// For producer threads (back-pressure): call it before producing each chunk of output. Never call it from an [`Agent`] method (the
    /// CONTINUE that ends the wait is delivered on that same thread).
    pub fn wait_sendable(&self, s: SessionId) -> bool {
        let mut st = self.shared.lock();
        loop {
            if !st.link_open {
                return false;
            }
            match st.sessions.get(&s) {
                None => return false,
                Some(x) if x.closing => return false,
                Some(x) if !x.holds() => return true,
                Some(_) => {}
            }
            st = self.shared.cond.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Whether the link is still up.
    pub fn link_open(&self) -> bool {
        self.shared.lock().link_open
    }
}

fn writer_loop(mut stream: UnixStream, rx: Receiver<WriterCmd>, shared: Arc<Shared>) {
    let mut buf: Vec<u8> = Vec::new();
    loop {
        let mut stop = match rx.recv() {
            Ok(WriterCmd::Bytes(b)) => {
                buf = b;
                false
            }
            Ok(WriterCmd::Stop) | Err(_) => true,
        };
        while !stop && buf.len() < WRITE_BATCH {
            match rx.try_recv() {
                Ok(WriterCmd::Bytes(b)) => buf.extend_from_slice(&b),
                Ok(WriterCmd::Stop) => stop = true,
                Err(_) => break,
            }
        }
        if !buf.is_empty() {
            if let Err(e) = stream.write_all(&buf) {
                tracing::debug!(error = %e, "pod link write failed; closing the link");
                shared.mark_link_closed();
                let _ = stream.shutdown(Shutdown::Both);
                return;
            }
            let n = buf.len();
            let before = shared.queued.load(std::sync::atomic::Ordering::Relaxed);
            shared
                .queued
                .fetch_sub(n.min(before), std::sync::atomic::Ordering::Relaxed);
            if before > QUEUE_LIMIT {
                shared.cond.notify_all();
            }
            buf.clear();
        }
        if stop {
            return;
        }
    }
}

/// Why the read loop ended.
enum End {
    Eof,
    Io(io::Error),
    Protocol(String),
}

/// Serves one link on the calling thread until it ends: sends our HELLO (version 2 if
/// [`Agent::movable`], else 1), expects the daemon's HELLO (version 1 or 2) first, then
/// dispatches every message to `agent`. Protocol errors (malformed input, a first message that
/// isn't HELLO, a HELLO of another version) close the link with a warning and return `Err` of
/// kind `InvalidData`; EOF returns `Ok(())`.
///
/// [`AgentListener::serve`](super::AgentListener::serve) runs this on one thread per link; use
/// it directly for a custom accept loop or a test over `UnixStream::pair()`. A link served this
/// way has no daemon grace: its sessions end with it ([`Agent::orphan`] is not called).
pub fn serve_link<A: Agent>(stream: UnixStream, agent: A) -> io::Result<()> {
    serve_link_with(stream, move || agent, None)
}

/// [`serve_link`], making the handler only once the daemon's HELLO has arrived (a connection
/// that never completes the handshake costs no handler and gets no `link_closed`). With
/// `orphans`, the sessions left open when the link ends are handed to it (if the handler
/// keeps them), and a REOPEN re-binds one kept there.
pub(crate) fn serve_link_with<A: Agent>(
    stream: UnixStream,
    make: impl FnOnce() -> A,
    orphans: Option<&Orphans>,
) -> io::Result<()> {
    let (tx, rx) = crossbeam_channel::unbounded();
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            link_open: true,
            sessions: HashMap::new(),
            batching: None,
            batch: Vec::new(),
        }),
        cond: Condvar::new(),
        tx,
        queued: std::sync::atomic::AtomicUsize::new(0),
        sock: stream.try_clone()?,
    });
    let out = Outbox {
        shared: Arc::clone(&shared),
    };
    let wstream = stream.try_clone()?;
    let wshared = Arc::clone(&shared);
    let writer = std::thread::Builder::new()
        .name("claw-agent-link-writer".into())
        .spawn(move || writer_loop(wstream, rx, wshared))?;

    let mut hello = Vec::new();
    encode(
        &mut hello,
        0,
        &Msg::Hello {
            version: hello_version::<A>(),
            name: AGENT_NAME,
        },
    );
    // Counted in `queued` like all output, so no batch can overtake it.
    let _ = shared.to_writer(hello);

    let mut agent = None;
    let end = read_loop(&stream, make, &mut agent, &out, orphans);
    // The sessions the daemon did not close, with the DATA held for them, for the daemon
    // grace (none when the listener is stopping).
    let mut left_open: Vec<(SessionId, Vec<Vec<u8>>)> = Vec::new();
    {
        // A dispatch cut short by a protocol error: what it collected still goes out first.
        let mut st = shared.lock();
        st.batching = None;
        let _ = shared.batch_to_writer(&mut st);
        if agent.is_some() && orphans.is_some_and(|o| o.accepting()) {
            left_open = st
                .sessions
                .iter_mut()
                .filter(|(_, x)| !x.closing)
                .map(|(s, x)| (*s, std::mem::take(&mut x.held)))
                .collect();
        }
    }

    shared.mark_link_closed();
    let _ = shared.tx.send(WriterCmd::Stop);
    if let Some(agent) = agent.as_mut() {
        if let Some(orphans) = orphans {
            for (s, held) in left_open {
                if let Some(o) = agent.orphan(s) {
                    orphans.keep(s, o, held);
                }
            }
        }
        agent.link_closed(&out);
    }
    if matches!(end, End::Protocol(_)) {
        // Don't wait for a misbehaving peer to read what we had queued.
        let _ = stream.shutdown(Shutdown::Both);
    }
    let _ = writer.join();
    let _ = stream.shutdown(Shutdown::Both);
    match end {
        End::Eof => {
            tracing::debug!("pod link closed by the daemon");
            Ok(())
        }
        End::Io(e) => {
            tracing::debug!(error = %e, "pod link ended");
            Err(e)
        }
        End::Protocol(what) => {
            tracing::warn!("pod link protocol error, closing the link: {what}");
            Err(io::Error::new(io::ErrorKind::InvalidData, what))
        }
    }
}

/// The version our HELLO says: 2 for an agent that can move sessions, else 1 (see the crate
/// docs, "Moving sessions").
fn hello_version<A: Agent>() -> u8 {
    if A::movable() {
        VERSION_MIGRATE
    } else {
        VERSION
    }
}

fn read_loop<A: Agent>(
    mut stream: &UnixStream,
    make: impl FnOnce() -> A,
    slot: &mut Option<A>,
    out: &Outbox,
    orphans: Option<&Orphans>,
) -> End {
    let mut make = Some(make);
    let mut buf: Vec<u8> = Vec::with_capacity(READ_CHUNK);
    let mut filled = 0usize; // bytes of `buf` holding input
    let mut hello_seen = false;
    if let Err(e) = stream.set_read_timeout(Some(HANDSHAKE_TIMEOUT)) {
        return End::Io(e);
    }
    loop {
        // Decode every whole message in the buffer; what the agent sends meanwhile goes out
        // as one write at the end.
        let mut at = 0usize;
        let mut want = READ_CHUNK;
        out.shared.begin_batch();
        loop {
            match decode(&buf[at..filled]) {
                Ok(Decoded::NeedMore(n)) => {
                    want = want.max(n);
                    break;
                }
                Ok(Decoded::Msg {
                    session_id,
                    msg,
                    used,
                }) => {
                    at += used;
                    if !hello_seen {
                        match msg {
                            Msg::Hello { version, .. }
                                if (VERSION..=VERSION_MIGRATE).contains(&version) =>
                            {
                                hello_seen = true;
                                if let Some(make) = make.take() {
                                    *slot = Some(make());
                                }
                                if let Err(e) = stream.set_read_timeout(None) {
                                    return End::Io(e);
                                }
                            }
                            Msg::Hello { version, .. } => {
                                return End::Protocol(format!(
                                    "daemon speaks pod-link version {version}, we speak {VERSION} and {VERSION_MIGRATE}"
                                ));
                            }
                            other => {
                                return End::Protocol(format!(
                                    "first message was {}, not HELLO",
                                    other.ty().name()
                                ));
                            }
                        }
                        continue;
                    }
                    if let Some(agent) = slot.as_mut() {
                        dispatch(agent, out, session_id, msg, orphans);
                    }
                }
                Err(e) => return End::Protocol(e.to_string()),
            }
        }
        out.shared.end_batch();
        // Keep the unread tail at the front, then read more.
        buf.copy_within(at..filled, 0);
        filled -= at;
        if buf.len() < filled + want {
            buf.resize(filled + want, 0);
        }
        match stream.read(&mut buf[filled..]) {
            Ok(0) => {
                return if filled == 0 {
                    End::Eof
                } else {
                    End::Protocol(format!("EOF inside a message ({filled} bytes pending)"))
                };
            }
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if !hello_seen
                    && matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
            {
                return End::Protocol(format!("no HELLO within {HANDSHAKE_TIMEOUT:?}"));
            }
            Err(e) => return End::Io(e),
        }
    }
}

fn dispatch<A: Agent>(
    agent: &mut A,
    out: &Outbox,
    s: SessionId,
    msg: Msg<'_>,
    orphans: Option<&Orphans>,
) {
    let shared = &out.shared;
    // `live`: opened, and not closed by us (a CLOSE held while paused counts as closed).
    let live = |st: &State| st.sessions.get(&s).is_some_and(|x| !x.closing);
    match msg {
        Msg::Open(ref o) | Msg::Reopen(ref o) => {
            let reopen = matches!(msg, Msg::Reopen(_));
            {
                let mut st = shared.lock();
                if st.sessions.contains_key(&s) {
                    tracing::warn!(
                        session = s,
                        "OPEN/REOPEN for a session already open; ignored"
                    );
                    return;
                }
                st.sessions.insert(
                    s,
                    Sess {
                        may_import: reopen,
                        ..Sess::default()
                    },
                );
            }
            let info = OpenInfo {
                tenant: o.tenant,
                agent: o.agent,
                client_caps: o.client_caps,
                peer: o.peer.to_owned(),
                reopen,
            };
            match orphans.and_then(|r| r.take(s)) {
                Some(kept) if reopen => {
                    tracing::info!(
                        session = s,
                        "REOPEN of a kept session: re-bound to this link"
                    );
                    {
                        // What the old link held for it goes first.
                        let mut st = shared.lock();
                        for m in kept.held {
                            let _ = shared.enqueue(&mut st, m);
                        }
                    }
                    agent.rebind(s, &info, kept.orphan, out);
                }
                Some(kept) => {
                    // The daemon has no state for it (it lost it): the old session ends, a
                    // new one starts.
                    tracing::info!(
                        session = s,
                        "OPEN of a kept session: ending it and opening afresh"
                    );
                    drop(kept);
                    agent.open(s, &info, out);
                }
                None => agent.open(s, &info, out),
            }
        }
        Msg::Data(b) => {
            {
                let mut st = shared.lock();
                let Some(x) = st.sessions.get_mut(&s).filter(|x| !x.closing) else {
                    return;
                };
                if x.importing.is_some() {
                    queue_for_import(shared, &mut st, s, b);
                    return;
                }
                // Input came first: a plain REOPEN, no state follows.
                x.may_import = false;
            }
            agent.data(s, b, out);
        }
        Msg::Resize { cols, rows } => {
            if live(&shared.lock()) {
                agent.resize(s, cols, rows, out);
            }
        }
        Msg::Detached => {
            if live(&shared.lock()) {
                agent.detached(s, out);
            }
        }
        Msg::Attached => {
            if live(&shared.lock()) {
                agent.attached(s, out);
            }
        }
        Msg::Pause => {
            let was_live = {
                let mut st = shared.lock();
                match st.sessions.get_mut(&s) {
                    Some(x) => {
                        x.paused = true;
                        !x.closing
                    }
                    None => false,
                }
            };
            if was_live {
                agent.pause(s, out);
            }
        }
        Msg::Continue => {
            let was_live = {
                let mut st = shared.lock();
                let Some(x) = st.sessions.get_mut(&s) else {
                    return;
                };
                x.paused = false;
                // After an EXPORT: the move was called off, the session goes on here.
                x.exported = false;
                x.held_bytes = 0;
                x.input_held_by_output = false;
                let closing = x.closing;
                let held = std::mem::take(&mut x.held);
                if closing {
                    st.sessions.remove(&s);
                }
                for m in held {
                    let _ = shared.enqueue(&mut st, m);
                }
                shared.input_flow(&mut st, s);
                !closing
            };
            shared.cond.notify_all();
            if was_live {
                agent.resume_output(s, out);
            }
        }
        Msg::Close(reason) => {
            let removed = shared.lock().sessions.remove(&s);
            shared.cond.notify_all();
            if removed.is_some_and(|x| !x.closing) {
                agent.close(s, reason, out);
            }
        }
        Msg::Export => export(agent, out, s),
        Msg::State(chunk) => import(agent, out, s, chunk),
        Msg::Hello { .. } => tracing::warn!("HELLO in the middle of a pod link; ignored"),
        Msg::Unknown { ty, body } => {
            tracing::debug!(
                ty,
                len = body.len(),
                session = s,
                "unknown pod-link message; ignored"
            )
        }
    }
}

/// DATA for a session whose state is still arriving (STATE chunks after its REOPEN): it waits
/// for the import. Past [`INPUT_HIGH`] the session's input is paused (pod → daemon) until the
/// import; past [`INPUT_HARD_LIMIT`] (a daemon that ignores the PAUSE) it is dropped.
fn queue_for_import(shared: &Shared, st: &mut State, s: SessionId, b: &[u8]) {
    let Some(x) = st.sessions.get_mut(&s) else {
        return;
    };
    if x.import_queued + b.len() > INPUT_HARD_LIMIT {
        tracing::warn!(
            session = s,
            bytes = b.len(),
            "input for a session whose state is still arriving is over {} MiB; dropped",
            INPUT_HARD_LIMIT >> 20
        );
        return;
    }
    x.import_queued += b.len();
    x.import_queue.push_back(b.to_vec());
    if x.import_queued > INPUT_HIGH && !x.input_held_by_import {
        x.input_held_by_import = true;
        shared.input_flow(st, s);
    }
}

/// EXPORT (POD-LINK.md §8): what was held for the session goes out (it moves with the session's
/// replay ring), then the agent's state as STATE chunks and the empty STATE; from then on
/// nothing goes out for the session until CONTINUE (the move was called off) or CLOSE.
fn export<A: Agent>(agent: &mut A, out: &Outbox, s: SessionId) {
    let shared = &out.shared;
    let importing = {
        let mut st = shared.lock();
        let Some(x) = st.sessions.get_mut(&s) else {
            tracing::debug!(session = s, "EXPORT for a session not open here; ignored");
            return;
        };
        if x.exported {
            tracing::debug!(
                session = s,
                "EXPORT for a session already exported; ignored"
            );
            return;
        }
        let held = std::mem::take(&mut x.held);
        x.held_bytes = 0;
        x.input_held_by_output = false;
        if x.closing {
            // The agent closed it while it was paused: its last output and CLOSE go out now,
            // and there is no session left to move.
            st.sessions.remove(&s);
            for m in held {
                let _ = shared.enqueue(&mut st, m);
            }
            drop(st);
            shared.cond.notify_all();
            return;
        }
        x.exported = true;
        x.may_import = false;
        let importing = x.importing.take().is_some();
        x.import_queue.clear();
        x.import_queued = 0;
        x.input_held_by_import = false;
        for m in held {
            let _ = shared.enqueue(&mut st, m);
        }
        importing
    };
    let state = if importing {
        // Its own state had not all arrived: there is nothing whole to hand on.
        tracing::warn!(
            session = s,
            "EXPORT of a session whose state is still arriving; answered as not movable"
        );
        Export::NotMovable
    } else {
        agent.export(s)
    };
    let state = match state {
        Export::State(v) => v,
        Export::NotMovable => Vec::new(),
    };
    let mut buf = Vec::with_capacity(state.len() + 9 * (2 + state.len() / MAX_BODY));
    for chunk in state.chunks(MAX_BODY) {
        encode(&mut buf, s, &Msg::State(chunk));
    }
    encode(&mut buf, s, &Msg::State(&[]));
    let mut st = shared.lock();
    if st.sessions.contains_key(&s) {
        let _ = shared.enqueue(&mut st, buf);
    }
}

/// STATE from the daemon: a chunk of the state of a session that moved in (after its REOPEN);
/// the empty one ends it, and the agent imports it before the DATA that waited meanwhile.
fn import<A: Agent>(agent: &mut A, out: &Outbox, s: SessionId, chunk: &[u8]) {
    let shared = &out.shared;
    let (state, queued) = {
        let mut st = shared.lock();
        let Some(x) = st
            .sessions
            .get_mut(&s)
            .filter(|x| x.may_import && !x.closing)
        else {
            tracing::debug!(
                session = s,
                len = chunk.len(),
                "STATE for a session that is not moving in; ignored"
            );
            return;
        };
        if !chunk.is_empty() {
            let have = x.importing.as_ref().map_or(0, Vec::len);
            if have + chunk.len() <= MAX_IMPORT_STATE {
                x.importing
                    .get_or_insert_with(Vec::new)
                    .extend_from_slice(chunk);
                return;
            }
            tracing::warn!(
                session = s,
                "the state of a session moving in is over {} MiB; closing the session",
                MAX_IMPORT_STATE >> 20
            );
            x.importing = None;
            x.may_import = false;
            x.import_queue.clear();
            x.import_queued = 0;
            drop(st);
            let _ = out.close(s, CloseReason::Error);
            agent.close(s, CloseReason::Error, out);
            return;
        }
        x.may_import = false;
        x.import_queued = 0;
        (
            x.importing.take().unwrap_or_default(),
            std::mem::take(&mut x.import_queue),
        )
    };
    agent.import(s, state, out);
    for d in queued {
        let live = shared.lock().sessions.get(&s).is_some_and(|x| !x.closing);
        if !live {
            break;
        }
        agent.data(s, &d, out);
    }
    let mut st = shared.lock();
    if let Some(x) = st.sessions.get_mut(&s) {
        x.input_held_by_import = false;
        shared.input_flow(&mut st, s);
    }
}

#[cfg(test)]
mod tests {
    //! The link thread's batching (one write per dispatch, written by the link thread itself
    //! when the writer thread is idle): order, early flush of a large batch, back-pressure
    //! without dead-lock, and other threads' output kept in order with the batch.
    use super::*;
    use clawterm_core::podlink::Open;
    use std::io::{Read, Write};
    use std::sync::mpsc;

    const T: Duration = Duration::from_secs(20);

    /// Echoes DATA; a DATA `close` closes its session after echoing; a DATA `spawn` makes a
    /// thread send `from-thread` for the session while the link thread keeps dispatching.
    struct Echo {
        threads: Vec<std::thread::JoinHandle<()>>,
    }

    impl Agent for Echo {
        fn data(&mut self, s: SessionId, bytes: &[u8], out: &Outbox) {
            out.data(s, bytes).unwrap();
            if bytes == b"close" {
                out.close(s, CloseReason::Normal).unwrap();
            }
            if bytes == b"spawn" {
                let o = out.clone();
                self.threads.push(std::thread::spawn(move || {
                    o.data(s, b"from-thread").unwrap();
                }));
            }
        }
        fn link_closed(&mut self, _out: &Outbox) {
            for t in self.threads.drain(..) {
                let _ = t.join();
            }
        }
    }

    struct Daemon {
        s: UnixStream,
        buf: Vec<u8>,
    }

    impl Daemon {
        fn start() -> (Daemon, std::thread::JoinHandle<io::Result<()>>) {
            let (a, b) = UnixStream::pair().unwrap();
            let h = std::thread::spawn(move || {
                serve_link(
                    b,
                    Echo {
                        threads: Vec::new(),
                    },
                )
            });
            a.set_read_timeout(Some(T)).unwrap();
            let mut d = Daemon {
                s: a,
                buf: Vec::new(),
            };
            let mut v = Vec::new();
            encode(
                &mut v,
                0,
                &Msg::Hello {
                    version: VERSION,
                    name: "test",
                },
            );
            d.s.write_all(&v).unwrap();
            assert!(matches!(d.recv(), (0, 0x01, _)), "HELLO first");
            (d, h)
        }

        fn open(&mut self, sids: impl IntoIterator<Item = u32>) {
            let mut v = Vec::new();
            for sid in sids {
                encode(
                    &mut v,
                    sid,
                    &Msg::Open(Open {
                        tenant: 1,
                        agent: 1,
                        client_caps: 1,
                        peer: "127.0.0.1:1",
                    }),
                );
            }
            self.s.write_all(&v).unwrap();
        }

        /// (session, message type, DATA body or empty).
        fn recv(&mut self) -> (u32, u8, Vec<u8>) {
            loop {
                match decode(&self.buf).unwrap() {
                    Decoded::Msg {
                        session_id,
                        msg,
                        used,
                    } => {
                        let body = match msg {
                            Msg::Data(b) => b.to_vec(),
                            _ => Vec::new(),
                        };
                        let ty = msg.ty().code();
                        self.buf.drain(..used);
                        return (session_id, ty, body);
                    }
                    Decoded::NeedMore(_) => {
                        let mut chunk = [0u8; 65536];
                        let n = self.s.read(&mut chunk).expect("read from the agent");
                        assert!(n > 0, "agent closed the link");
                        self.buf.extend_from_slice(&chunk[..n]);
                    }
                }
            }
        }
    }

    #[test]
    fn a_dispatch_answers_in_order_with_close_after_its_data() {
        let (mut d, h) = Daemon::start();
        d.open(1..=50);
        let mut v = Vec::new();
        for k in 0..500u32 {
            let sid = 1 + k % 50;
            encode(&mut v, sid, &Msg::Data(format!("m{k}").as_bytes()));
        }
        encode(&mut v, 7, &Msg::Data(b"close"));
        encode(&mut v, 7, &Msg::Data(b"after-close"));
        d.s.write_all(&v).unwrap();
        for k in 0..500u32 {
            assert_eq!(
                d.recv(),
                (1 + k % 50, 0x10, format!("m{k}").into_bytes()),
                "echo {k}"
            );
        }
        assert_eq!(d.recv(), (7, 0x10, b"close".to_vec()));
        assert_eq!(d.recv().1, 0x30, "CLOSE right after the DATA before it");
        // Nothing is sent for a closed session: the next thing is this echo.
        v.clear();
        encode(&mut v, 8, &Msg::Data(b"probe"));
        d.s.write_all(&v).unwrap();
        assert_eq!(d.recv(), (8, 0x10, b"probe".to_vec()));
        drop(d);
        h.join().unwrap().unwrap();
    }

    #[test]
    fn large_batches_and_a_daemon_that_does_not_read_neither_lose_nor_dead_lock() {
        let (mut d, h) = Daemon::start();
        d.open([1, 2]);
        // 8 MiB of DATA in 8 KiB messages, written by a thread while this one does not read:
        // the agent's output passes both the batch limit and the writer's queue limit.
        let mut w = d.s.try_clone().unwrap();
        let body = vec![0xA5u8; 8192];
        let writer = std::thread::spawn(move || {
            let mut v = Vec::new();
            for k in 0..1024u32 {
                v.clear();
                let mut b = body.clone();
                b[..4].copy_from_slice(&k.to_be_bytes());
                encode(&mut v, 1 + k % 2, &Msg::Data(&b));
                w.write_all(&v).unwrap();
            }
        });
        std::thread::sleep(Duration::from_millis(300));
        let (tx, rx) = mpsc::channel();
        let reader = std::thread::spawn(move || {
            for k in 0..1024u32 {
                let (sid, ty, b) = d.recv();
                assert_eq!((sid, ty, b.len()), (1 + k % 2, 0x10, 8192), "echo {k}");
                assert_eq!(b[..4], k.to_be_bytes(), "echo {k} in order");
            }
            tx.send(()).unwrap();
            d
        });
        rx.recv_timeout(T)
            .expect("every echo arrives (no dead-lock)");
        writer.join().unwrap();
        drop(reader.join().unwrap());
        h.join().unwrap().unwrap();
    }

    #[test]
    fn another_threads_output_stays_in_order_with_the_batch() {
        let (mut d, h) = Daemon::start();
        d.open([1]);
        let mut v = Vec::new();
        encode(&mut v, 1, &Msg::Data(b"spawn"));
        d.s.write_all(&v).unwrap();
        assert_eq!(d.recv(), (1, 0x10, b"spawn".to_vec()));
        assert_eq!(d.recv(), (1, 0x10, b"from-thread".to_vec()));
        for k in 0..200u32 {
            v.clear();
            encode(&mut v, 1, &Msg::Data(format!("x{k}").as_bytes()));
            d.s.write_all(&v).unwrap();
            assert_eq!(d.recv(), (1, 0x10, format!("x{k}").into_bytes()));
        }
        drop(d);
        h.join().unwrap().unwrap();
    }
}

#[cfg(test)]
mod migration_tests {
    //! Moving sessions (POD-LINK.md §8) over real Unix sockets to an [`AgentListener`]: the
    //! HELLO versions, EXPORT on the source (state, then nothing more; CLOSE 5 or CONTINUE
    //! after it) and REOPEN + STATE on the target (the import before the first DATA).
    use super::*;
    use crate::testutil::*;
    use crate::{EchoAgent, ExecAgent, ShellAgent};
    use std::sync::Arc;

    /// The type codes of what `d` got for `sid` after the `n`th message it got, in order.
    fn after(d: &Daemon, sid: u32, n: usize) -> Vec<u8> {
        d.seen[n..]
            .iter()
            .filter(|(s, _)| *s == sid)
            .map(|&(_, t)| t)
            .collect()
    }

    /// Where the empty STATE of `sid` is in what `d` got.
    fn end_of_state(d: &Daemon, sid: u32) -> usize {
        let ends: Vec<usize> = d
            .seen
            .iter()
            .enumerate()
            .filter(|(_, &(s, t))| s == sid && t == 0x51)
            .map(|(i, _)| i)
            .collect();
        *ends.last().expect("a STATE")
    }

    #[test]
    fn echo_says_hello_2_and_exports_an_empty_state_then_nothing_more() {
        let _g = serial();
        let pod = Pod::start(Duration::ZERO, || EchoAgent);
        let mut d = pod.connect();
        assert_eq!(d.wait_hello(), 2, "echo can move its sessions");
        d.open(3);
        d.open(4);
        d.input(3, "hi");
        d.wait_for(3, "hi");
        d.send(3, &Msg::Pause);
        d.send(3, &Msg::Export);
        assert_eq!(d.wait_state(3), Vec::<Vec<u8>>::new(), "one empty STATE");
        let end = end_of_state(&d, 3);
        // Input after the EXPORT (a daemon would hold it) is echoed into the void, and the
        // PAUSE the SDK would send for the input once the held output passed its threshold
        // is not sent either.
        d.input(3, "late");
        d.send(3, &Msg::Data(&vec![b'x'; HELD_INPUT_PAUSE + 1]));
        d.input(4, "probe");
        d.wait_for(4, "probe");
        // The move completes.
        d.send(3, &Msg::Close(CloseReason::Roamed));
        d.input(4, " probe-2");
        d.wait_for(4, "probe-2");
        assert_eq!(
            after(&d, 3, end + 1),
            Vec::<u8>::new(),
            "nothing after the STATE"
        );
        assert_eq!(d.text(3), "hi");
        d.end();
        pod.stop();
    }

    #[test]
    fn echoes_held_by_the_pause_go_out_before_the_state() {
        let _g = serial();
        let pod = Pod::start(Duration::ZERO, || EchoAgent);
        let mut d = pod.connect();
        d.open(3);
        d.open(4);
        d.send(3, &Msg::Pause);
        d.input(3, "held");
        d.input(4, "probe");
        d.wait_for(4, "probe");
        assert_eq!(d.text(3), "", "held while paused");
        d.send(3, &Msg::Export);
        d.wait_state(3);
        assert_eq!(d.text(3), "held");
        assert_eq!(after(&d, 3, 0), [0x10, 0x51], "DATA, then the empty STATE");
        d.end();
        pod.stop();
    }

    #[test]
    fn a_called_off_move_goes_on_as_if_nothing_had_happened() {
        let _g = serial();
        let pod = Pod::start(Duration::ZERO, || EchoAgent);
        let mut d = pod.connect();
        d.open(3);
        d.input(3, "a ");
        d.wait_for(3, "a ");
        d.send(3, &Msg::Pause);
        d.send(3, &Msg::Export);
        d.wait_state(3);
        d.input(3, "b ");
        d.open(4);
        d.input(4, "probe");
        d.wait_for(4, "probe");
        assert_eq!(d.text(3), "a ", "held after the EXPORT");
        d.send(3, &Msg::Continue);
        d.input(3, "c");
        d.wait_for(3, "c");
        assert_eq!(d.text(3), "a b c");
        d.end();
        pod.stop();
    }

    /// What [`Soul`] was told, in order.
    type Events = Arc<Mutex<Vec<String>>>;

    /// A movable agent whose state is what each session sent; it answers each input with the
    /// length of that state.
    struct Soul {
        logs: HashMap<SessionId, Vec<u8>>,
        events: Events,
    }

    impl Soul {
        fn note(&self, e: String) {
            self.events.lock().unwrap().push(e);
        }
    }

    impl Agent for Soul {
        fn movable() -> bool {
            true
        }
        fn open(&mut self, s: SessionId, info: &OpenInfo, _out: &Outbox) {
            self.logs.insert(s, Vec::new());
            self.note(format!("open {s} reopen={}", info.reopen));
        }
        fn data(&mut self, s: SessionId, bytes: &[u8], out: &Outbox) {
            let log = self.logs.entry(s).or_default();
            log.extend_from_slice(bytes);
            let n = log.len();
            if bytes.len() < 100 {
                self.note(format!("data {s} {}", String::from_utf8_lossy(bytes)));
            }
            let _ = out.data(s, format!("<{n}>").as_bytes());
        }
        fn export(&mut self, s: SessionId) -> Export {
            self.note(format!("export {s}"));
            Export::State(self.logs.get(&s).cloned().unwrap_or_default())
        }
        fn import(&mut self, s: SessionId, state: Vec<u8>, _out: &Outbox) {
            if state.len() < 100 {
                self.note(format!("import {s} {}", String::from_utf8_lossy(&state)));
            } else {
                self.note(format!("import {s} {} bytes", state.len()));
            }
            self.logs.insert(s, state);
        }
        fn close(&mut self, s: SessionId, reason: CloseReason, _out: &Outbox) {
            self.logs.remove(&s);
            self.note(format!("close {s} {}", reason.name()));
        }
        fn resume_output(&mut self, s: SessionId, _out: &Outbox) {
            self.note(format!("continue {s}"));
        }
    }

    fn soul_pod() -> (Pod, Events) {
        let events = Events::default();
        let e = Arc::clone(&events);
        let pod = Pod::start(Duration::ZERO, move || Soul {
            logs: HashMap::new(),
            events: Arc::clone(&e),
        });
        (pod, events)
    }

    fn events(e: &Events) -> Vec<String> {
        e.lock().unwrap().clone()
    }

    #[test]
    fn a_session_moving_in_is_imported_before_its_first_data() {
        let _g = serial();
        let (pod, ev) = soul_pod();
        let mut d = pod.connect();
        assert_eq!(d.wait_hello(), 2);
        d.reopen(5);
        d.send(5, &Msg::Detached); // as the daemon does for a suspended session
        d.send(5, &Msg::State(b"ab"));
        d.input(5, "x"); // early: waits for the import
        d.send(5, &Msg::State(b"c"));
        d.send(5, &Msg::State(b""));
        d.input(5, "y");
        d.wait_for(5, "<5>");
        assert_eq!(d.text(5), "<4><5>", "the state, then x, then y");
        assert_eq!(
            events(&ev),
            ["open 5 reopen=true", "import 5 abc", "data 5 x", "data 5 y"]
        );
        d.end();
        pod.stop();
    }

    #[test]
    fn a_plain_reopen_gets_no_import_and_a_stray_state_is_ignored() {
        let _g = serial();
        let (pod, ev) = soul_pod();
        let mut d = pod.connect();
        d.reopen(6);
        d.input(6, "x");
        d.send(6, &Msg::State(b"zz")); // after DATA: not a move
        d.send(6, &Msg::State(b""));
        d.open(7);
        d.send(7, &Msg::State(b"q")); // after OPEN: not a move
        d.send(7, &Msg::State(b""));
        d.send(8, &Msg::State(b"")); // no such session
        d.input(6, "y");
        d.input(7, "z");
        d.wait_for(7, "<1>");
        d.wait_for(6, "<2>");
        assert_eq!(
            events(&ev),
            [
                "open 6 reopen=true",
                "data 6 x",
                "open 7 reopen=false",
                "data 6 y",
                "data 7 z"
            ]
        );
        d.end();
        pod.stop();
    }

    #[test]
    fn a_big_state_moves_in_chunks_of_1_mib_and_close_5_reaches_the_agent() {
        let _g = serial();
        let (pod, ev) = soul_pod();
        let mut src = pod.connect();
        src.open(9);
        let big = vec![b's'; 900 * 1024];
        for _ in 0..3 {
            src.send(9, &Msg::Data(&big));
        }
        let total = 3 * big.len();
        src.wait_for(9, &format!("<{total}>"));
        src.send(9, &Msg::Pause);
        src.send(9, &Msg::Export);
        let chunks = src.wait_state(9);
        let sizes: Vec<usize> = chunks.iter().map(Vec::len).collect();
        assert_eq!(sizes, [MAX_BODY, MAX_BODY, total - 2 * MAX_BODY]);
        // The target: another link (another daemon's, in real life).
        let mut dst = pod.connect();
        dst.reopen(10);
        for c in &chunks {
            dst.send(10, &Msg::State(c));
        }
        dst.send(10, &Msg::State(b""));
        dst.input(10, "!");
        dst.wait_for(10, &format!("<{}>", total + 1));
        src.send(9, &Msg::Close(CloseReason::Roamed));
        src.open(11);
        src.input(11, "probe");
        src.wait_for(11, "<5>");
        let e = events(&ev);
        assert!(e.contains(&"export 9".to_owned()), "{e:?}");
        assert!(e.contains(&format!("import 10 {total} bytes")), "{e:?}");
        assert!(e.contains(&"close 9 roamed".to_owned()), "{e:?}");
        assert!(
            !e.iter().any(|x| x.starts_with("continue 9")),
            "no CONTINUE for a session that moved: {e:?}"
        );
        src.end();
        dst.end();
        pod.stop();
    }

    #[test]
    fn input_waiting_for_the_import_is_paused_past_its_threshold_and_then_delivered() {
        let _g = serial();
        let (pod, ev) = soul_pod();
        let mut d = pod.connect();
        d.reopen(5);
        d.send(5, &Msg::State(b"st"));
        let chunk = vec![b'i'; 64 * 1024];
        let n = crate::INPUT_HIGH / chunk.len() + 1;
        for _ in 0..n {
            d.send(5, &Msg::Data(&chunk));
        }
        wait_until("an input PAUSE", || {
            d.pump(Duration::from_millis(10));
            d.input_pauses.get(&5) == Some(&1)
        });
        assert_eq!(d.text(5), "", "nothing delivered before the import");
        d.send(5, &Msg::State(b""));
        let total = 2 + n * chunk.len();
        d.wait_for(5, &format!("<{total}>"));
        wait_until("the input CONTINUE", || {
            d.pump(Duration::from_millis(10));
            d.seen.last() == Some(&(5, 0x41))
        });
        assert_eq!(events(&ev)[..2], ["open 5 reopen=true", "import 5 st"]);
        d.end();
        pod.stop();
    }

    #[test]
    fn a_state_over_the_limit_closes_the_session_not_the_link() {
        let _g = serial();
        let (pod, ev) = soul_pod();
        let mut d = pod.connect();
        d.reopen(5);
        let chunk = vec![0u8; MAX_BODY];
        for _ in 0..MAX_IMPORT_STATE / MAX_BODY {
            d.send(5, &Msg::State(&chunk));
        }
        d.send(5, &Msg::State(b"!"));
        assert_eq!(d.wait_close(5), CloseReason::Error);
        d.open(6);
        d.input(6, "alive");
        d.wait_for(6, "<5>");
        assert!(events(&ev).contains(&"close 5 error".to_owned()));
        d.end();
        pod.stop();
    }

    #[test]
    fn exec_and_shell_say_hello_1() {
        let _g = serial();
        let argv = Arc::new(vec![std::ffi::OsString::from("cat")]);
        let pod = Pod::start(Duration::ZERO, move || ExecAgent::new(Arc::clone(&argv)));
        let mut d = pod.connect();
        assert_eq!(d.wait_hello(), 1, "exec cannot move a running process");
        d.end();
        pod.stop();
        let shell = Arc::new(crate::shell_path(None));
        let pod = Pod::start(Duration::ZERO, move || ShellAgent::new(Arc::clone(&shell)));
        let mut d = pod.connect();
        assert_eq!(d.wait_hello(), 1, "shell cannot move a running process");
        d.end();
        pod.stop();
    }

    #[test]
    fn a_non_movable_agent_answers_export_with_an_empty_state_at_once() {
        let _g = serial();
        let argv = Arc::new(vec![std::ffi::OsString::from("cat")]);
        let pod = Pod::start(Duration::ZERO, move || ExecAgent::new(Arc::clone(&argv)));
        let mut d = pod.connect();
        d.open(3);
        d.input(3, "before\n");
        d.wait_for(3, "before");
        d.send(3, &Msg::Pause);
        d.send(3, &Msg::Export);
        assert_eq!(d.wait_state(3), Vec::<Vec<u8>>::new());
        d.send(3, &Msg::Close(CloseReason::Roamed));
        d.end();
        pod.stop();
    }
}
