//! One pod link: the HELLO exchange, the read/dispatch loop, and the [`Outbox`].

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};

use super::orphans::Orphans;
use super::{Agent, OpenInfo, SessionId, AGENT_NAME};
use clawterm_core::podlink::codec::VERSION;
use clawterm_core::podlink::{decode, encode, CloseReason, Decoded, Msg, MAX_BODY};

/// How long the daemon has to send its HELLO after connecting.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The writer coalesces queued messages into writes of about this size.
const WRITE_BATCH: usize = 256 * 1024;
/// Read chunk size.
const READ_CHUNK: usize = 64 * 1024;

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
    /// STATE chunks arriving after a REOPEN (a session moving in), until the empty STATE.
    importing: Option<Vec<u8>>,
}

impl Sess {
    fn hold(&mut self, buf: Vec<u8>, closing: bool) {
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
        let want = self.input_held_by_agent || self.input_held_by_output;
        if self.closing || want == self.input_pause_sent {
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
        if sess.paused {
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
        if st.sessions.get(&s).is_some_and(|x| x.paused) {
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
                && st.sessions.get(&s).is_some_and(|x| !x.paused && !x.closing);
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

    /// Whether the daemon has paused `s` (PAUSE without CONTINUE yet).
    pub fn is_paused(&self, s: SessionId) -> bool {
        self.shared
            .lock()
            .sessions
            .get(&s)
            .is_some_and(|x| x.paused)
    }

    /// Blocks while the daemon has `s` paused. Returns `true` when DATA may be sent, `false`
    /// once the session or the link is closed. For producer threads (back-pressure): call it
    /// before producing each chunk of output. Never call it from an [`Agent`] method (the
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
                Some(x) if !x.paused => return true,
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

/// Serves one link on the calling thread until it ends: sends our HELLO, expects the daemon's
/// HELLO first, then dispatches every message to `agent`. Protocol errors (malformed input, a
/// first message that isn't HELLO, a HELLO of another version) close the link with a warning
/// and return `Err` of kind `InvalidData`; EOF returns `Ok(())`.
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
            version: if A::MOVABLE {
                clawterm_core::podlink::codec::VERSION_MIGRATE
            } else {
                VERSION
            },
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
                                if (VERSION..=clawterm_core::podlink::codec::VERSION_MIGRATE)
                                    .contains(&version) =>
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
                                    "daemon speaks pod-link version {version}, we speak {VERSION}"
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
                st.sessions.insert(s, Sess::default());
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
            if live(&shared.lock()) {
                agent.data(s, b, out);
            }
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
        Msg::Export => {
            // ClawRoam: the session leaves this pod. What was held while paused goes first,
            // then the state and the empty STATE, and nothing more for it.
            let live_now = live(&shared.lock());
            if !live_now {
                return;
            }
            let state = if A::MOVABLE {
                agent.export(s)
            } else {
                crate::Export::NotMovable
            };
            // The session stays (paused: what the agent sends meanwhile is held) until CLOSE
            // reason 5 (it moved: forgotten, dropping what was held) or CONTINUE (the move was
            // called off: it goes on here as if nothing happened).
            let mut st = shared.lock();
            let held = match st.sessions.get_mut(&s) {
                Some(x) => {
                    x.paused = true;
                    x.held_bytes = 0;
                    std::mem::take(&mut x.held)
                }
                None => Vec::new(),
            };
            for m in held {
                let _ = shared.enqueue(&mut st, m);
            }
            let mut buf = Vec::new();
            if let crate::Export::State(bytes) = &state {
                for chunk in bytes.chunks(MAX_BODY) {
                    encode(&mut buf, s, &Msg::State(chunk));
                }
            }
            encode(&mut buf, s, &Msg::State(&[]));
            let _ = shared.enqueue(&mut st, buf);
            drop(st);
            shared.cond.notify_all();
        }
        Msg::State(chunk) => {
            // A session moving in: its state follows its REOPEN, ending with an empty STATE.
            let done = {
                let mut st = shared.lock();
                let Some(x) = st.sessions.get_mut(&s) else {
                    return;
                };
                let buf = x.importing.get_or_insert_with(Vec::new);
                if chunk.is_empty() {
                    x.importing.take()
                } else {
                    buf.extend_from_slice(chunk);
                    None
                }
            };
            if let Some(state) = done {
                agent.import(s, state, out);
            }
        }
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
