//! The agent SDK: write a pod that `clawtermd` can talk to in a page of code.
//!
//! An agent pod listens on `{socket_dir}/{tenant}_{agent}` ([`AgentListener::bind`]) and serves
//! *links* from `clawtermd` ([`AgentListener::serve`]). Each link carries many sessions; the SDK
//! does the HELLO exchange, decodes messages, and calls one [`Agent`] per link (made by your
//! factory) for every session event. Replies go through an [`Outbox`], which can be cloned and
//! used from any thread (a PTY or pipe reader, a timer, ...).
//!
//! The SDK keeps the contract for you (see `docs/POD-LINK.md`):
//! * nothing is sent for a session after CLOSE in either direction (later sends are dropped);
//! * DATA bodies over 1 MiB are split;
//! * DATA sent while the daemon has PAUSEd a session is held and flushed on CONTINUE, in order,
//!   and [`Outbox::wait_sendable`] lets a producer thread block instead (back-pressure);
//! * input has brakes too: once more than [`HELD_INPUT_PAUSE`] bytes of output are held for a
//!   paused session, the SDK PAUSEs that session's input (pod → daemon) until the daemon's
//!   CONTINUE, so an agent that answers input (an echo, a REPL) stays bounded; an agent that
//!   feeds input to something slower uses [`input_queue`] ([`Outbox::pause_input`] by hand);
//! * the link thread never blocks on the socket's write side: output goes through a per-link
//!   writer thread, so a daemon that is busy writing to us cannot dead-lock the link;
//! * malformed input closes the link with a warning, never a panic;
//! * sessions outlive the daemon: when a link ends without a CLOSE for a session, an agent that
//!   hands the session's state over ([`Agent::orphan`]) gets it back on the link that REOPENs
//!   it within the listener's daemon grace ([`Agent::rebind`], [`AgentListener::daemon_grace`]),
//!   with the DATA the SDK was holding for it sent first;
//! * sessions can move to another node (ClawRoam, POD-LINK.md §8) with their agent's state: an
//!   agent that says so ([`Agent::movable`]) hands a session's state over on EXPORT
//!   ([`Agent::export`]) and gets it back on the target ([`Agent::import`]) before the session's
//!   next input — see "Moving sessions" below.
//!
//! The agents `claw-agent` runs are here too, ready to serve or to wrap: [`EchoAgent`],
//! [`ExecAgent`] (one process per session on pipes) and [`ShellAgent`] (a login shell in a PTY
//! per session, started with `posix_spawn`). Both serve all the sessions of a link from one
//! event-loop thread, at 2 (shell) or 3 (exec) descriptors and no thread per session — see
//! `docs/POD-LINK.md`, "How `shell` and `exec` run their sessions". All three keep their
//! sessions across a daemon restart (POD-LINK.md §7).
//!
//! ```no_run
//! use clawterm_agent::{Agent, AgentListener, Outbox, SessionId};
//!
//! struct Echo;
//! impl Agent for Echo {
//!     fn data(&mut self, s: SessionId, bytes: &[u8], out: &Outbox) {
//!         let _ = out.data(s, bytes);
//!     }
//! }
//!
//! let listener = AgentListener::bind("/run/claw/sockets".as_ref(), 1, 7)?;
//! listener.serve(|| Echo, clawterm_agent::stop_on_signals())?;
//! # Ok::<(), std::io::Error>(())
//! ```
//!
//! # Moving sessions (ClawRoam)
//!
//! A pod says in its HELLO whether it can move sessions: version 2
//! ([`VERSION_MIGRATE`](clawterm_core::podlink::codec::VERSION_MIGRATE)) means it understands
//! EXPORT and STATE; a pod of version 1 never receives them, and the daemon moves its sessions
//! only when the operator forces it (the target pod then sees a plain REOPEN and starts the
//! session afresh). The SDK says 2 on the links of an agent whose [`Agent::movable`] is `true`,
//! 1 otherwise, and accepts a daemon that says 1 or 2.
//!
//! * **Source.** The daemon sends PAUSE, then EXPORT. The SDK sends what it was holding for the
//!   session (output the PAUSE held back: it goes into the session's replay ring and moves with
//!   it), calls [`Agent::export`] and sends the state it returns as STATE messages of at most
//!   1 MiB each, then the empty STATE that ends it. From then on nothing more goes out for the
//!   session: what the agent sends for it is held. If the move completes, the daemon's CLOSE
//!   reason 5 ([`CloseReason::Roamed`]) reaches [`Agent::close`] and the SDK forgets the
//!   session (and what it held); if the move is called off, the daemon's CONTINUE flushes what
//!   was held and reaches [`Agent::resume_output`], and the session goes on here as if nothing
//!   had happened. So `export` must not end the session: it ends on `close`.
//! * **Target.** The daemon sends REOPEN ([`Agent::open`] with `info.reopen`, or
//!   [`Agent::rebind`]), then the state as STATE messages ending with an empty one, then the
//!   input it held during the move. The SDK collects the chunks and calls [`Agent::import`]
//!   with the whole state before it delivers any DATA for the session (DATA that arrives before
//!   the empty STATE waits, bounded, in the SDK). A REOPEN without STATE (a pod or daemon
//!   restart, or a forced move of a version-1 pod's session) gets no `import`.
//!
//! **Empty state, and "cannot export".** The contract gives a pod two ways to answer EXPORT
//! with nothing: a session whose state is empty (an echo) and a session that cannot move (a
//! running process) both answer with one empty STATE, and the daemon cannot tell them apart.
//! The SDK keeps the contract as it is (the empty STATE always ends the state; there is no
//! marker byte) and leaves the distinction to the HELLO:
//! * [`Agent::export`] returns [`Export::State`] (the bytes, sent in chunks of at most 1 MiB —
//!   none at all for empty state — then the empty STATE) or [`Export::NotMovable`] (the empty
//!   STATE at once). On the wire the two are the same when the state is empty.
//! * The daemon reads "HELLO 2 + empty state" as *movable with empty state* (`echo`) and
//!   "HELLO 1" as *not movable* (moved only by the operator's explicit force). So an agent that
//!   cannot move its sessions must say HELLO 1 — leave [`Agent::movable`] `false` — rather than
//!   answer `NotMovable`: `NotMovable` from a movable agent is moved as empty state, and the
//!   target starts from nothing. That is why [`EchoAgent`] says 2 and [`ExecAgent`] and
//!   [`ShellAgent`] keep HELLO 1 on their links: a running process (its memory, its open files,
//!   its terminal) cannot be serialised into STATE, and a HELLO 2 would make every one of their
//!   sessions look movable with empty state — a move would silently restart the program on the
//!   target. (Their `export` is the default `NotMovable` anyway, for a daemon that sends EXPORT
//!   to a version-1 pod regardless.)

mod echo;
mod exec;
mod input;
mod link;
mod listener;
mod orphans;
pub mod pty;
mod ptyloop;
mod shell;
mod signal;
#[cfg(test)]
mod testutil;

pub use echo::EchoAgent;
pub use exec::ExecAgent;
pub use input::{input_queue, InputReceiver, InputSender, INPUT_HARD_LIMIT, INPUT_HIGH, INPUT_LOW};
pub use link::{serve_link, Outbox, HELD_INPUT_PAUSE, MAX_IMPORT_STATE};
pub use listener::AgentListener;
pub use orphans::{Orphan, DEFAULT_DAEMON_GRACE};
pub use shell::{shell_path, ShellAgent};
pub use signal::stop_on_signals;

pub use clawterm_core::podlink::CloseReason;

/// What [`Agent::export`] answers for a session that is leaving this node (EXPORT).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Export {
    /// The session's state: the SDK sends it as STATE chunks of at most 1 MiB (none for an
    /// empty state), then the empty STATE that ends it. The target's [`Agent::import`] gets
    /// these bytes.
    State(Vec<u8>),
    /// This session cannot be exported: the SDK answers the empty STATE at once. The daemon
    /// cannot tell this from an empty state (see the crate docs, "Empty state, and cannot
    /// export"): an agent whose sessions cannot move says so with [`Agent::movable`] `false`.
    NotMovable,
}

/// Tests that open PTYs or count process-wide descriptors and threads take this lock, so
/// that they don't see each other's.
#[cfg(test)]
pub(crate) static TEST_SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// A session's id on its link (the pod-link SESSION_ID).
pub type SessionId = u32;

/// Name this SDK announces in its HELLO.
pub const AGENT_NAME: &str = "claw-agent";

/// What an OPEN or REOPEN said about a session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpenInfo {
    pub tenant: u32,
    pub agent: u32,
    /// The client's capability bits, as the daemon forwarded them.
    pub client_caps: u8,
    /// The client's address (e.g. `127.0.0.1:50000`).
    pub peer: String,
    /// `true` for REOPEN: an existing session re-bound to this pod (the pod or the daemon
    /// restarted, or the session roamed in). [`Agent::open`] with `reopen` set means this pod
    /// holds nothing of the session (it restarted, or the daemon grace ran out): start it
    /// afresh. A session the pod kept as an [`Orphan`] goes to [`Agent::rebind`] instead.
    pub reopen: bool,
}

/// A link's handler: the SDK makes one per link (from the factory given to
/// [`AgentListener::serve`]) and calls it, from the link's own thread, for every session of
/// that link. Only [`Agent::data`] is required.
///
/// Calls for a session arrive between its `open` (or `rebind`) and its `close` (or `orphan`,
/// or `link_closed`); events for unknown or already-closed sessions are dropped by the SDK.
/// Don't block for long in these methods: the whole link waits (hand slow work to a thread and
/// reply via a clone of the [`Outbox`]).
///
/// **Daemon restarts.** When a link ends while sessions are open on it (the daemon exited or
/// crashed without closing them) and the listener has a daemon grace
/// ([`AgentListener::daemon_grace`], 60 s by default), the SDK calls [`Agent::orphan`] for
/// each of them before [`Agent::link_closed`]. A session whose state the agent returns lives on
/// without a link; a REOPEN of its SESSION_ID on any link of the listener within the grace
/// continues it with [`Agent::rebind`] (on that link's handler, which may be another one); an
/// OPEN of it, or the end of the grace, drops the [`Orphan`], which ends it. The default
/// `orphan` keeps nothing: the session ends with the link, as `link_closed` says. See
/// `docs/POD-LINK.md` §7.
///
/// **Moving sessions.** An agent whose [`Agent::movable`] is `true` can have its sessions moved
/// to another node with their state ([`Agent::export`] on the source, [`Agent::import`] on the
/// target); see the crate docs, "Moving sessions (ClawRoam)".
pub trait Agent {
    /// A session was opened (OPEN) or re-bound to this pod (REOPEN, `info.reopen`) with
    /// nothing of it kept here: start it.
    fn open(&mut self, s: SessionId, info: &OpenInfo, out: &Outbox) {
        let _ = (s, info, out);
    }
    /// The client sent bytes.
    fn data(&mut self, s: SessionId, bytes: &[u8], out: &Outbox);
    /// The client's terminal size changed.
    fn resize(&mut self, s: SessionId, cols: u16, rows: u16, out: &Outbox) {
        let _ = (s, cols, rows, out);
    }
    /// The client went away; the session lives on (output is kept for it by the daemon).
    fn detached(&mut self, s: SessionId, out: &Outbox) {
        let _ = (s, out);
    }
    /// A client is back.
    fn attached(&mut self, s: SessionId, out: &Outbox) {
        let _ = (s, out);
    }
    /// The daemon asked us to stop sending DATA for `s` (PAUSE). The SDK already holds any DATA
    /// sent meanwhile; an agent with an unbounded producer should stop producing.
    fn pause(&mut self, s: SessionId, out: &Outbox) {
        let _ = (s, out);
    }
    /// Sending may resume (CONTINUE). Held DATA has been flushed before this call.
    fn resume_output(&mut self, s: SessionId, out: &Outbox) {
        let _ = (s, out);
    }
    /// The daemon closed the session. Nothing more can be sent for it.
    fn close(&mut self, s: SessionId, reason: CloseReason, out: &Outbox) {
        let _ = (s, reason, out);
    }
    /// The link ended (EOF, error or protocol error) while `s` was open: the daemon went away
    /// without closing it. Called, only when the listener has a daemon grace, for each such
    /// session before [`Agent::link_closed`]; the link is already closed (nothing can be sent).
    ///
    /// Return the session's state as an [`Orphan`] to keep the session for a REOPEN (stop
    /// forgetting it here: no further call for `s` comes to this handler). Keep its output
    /// meanwhile without losing it and without unbounded memory: stop reading the program
    /// (its pipe or terminal then blocks it) or buffer a bounded amount. `None` (the default)
    /// ends the session with the link.
    fn orphan(&mut self, s: SessionId) -> Option<Orphan> {
        let _ = s;
        None
    }
    /// A REOPEN for `s`, which this listener kept as an orphan (returned by [`Agent::orphan`],
    /// perhaps of another handler): continue it on this link, with the same program. Take the
    /// state back with [`Orphan::downcast`]; send what the program produced meanwhile (it
    /// follows, in order, the output the SDK held for the session, which it sends first). The
    /// default ends the orphan and calls [`Agent::open`] (a fresh session).
    fn rebind(&mut self, s: SessionId, info: &OpenInfo, orphan: Orphan, out: &Outbox) {
        drop(orphan);
        self.open(s, info, out);
    }
    /// The link is gone (EOF, error, protocol error or the server stopping): every session
    /// still open on it, except those handed over by [`Agent::orphan`], is gone too. Last call
    /// on this handler.
    fn link_closed(&mut self, out: &Outbox) {
        let _ = out;
    }
    /// Whether this agent's sessions can move to another node (ClawRoam): `true` makes its
    /// links say HELLO version 2, so the daemon may EXPORT its sessions ([`Agent::export`]) and
    /// bring sessions in with their state ([`Agent::import`]); `false` (the default) says
    /// version 1, and the daemon moves its sessions only when the operator forces it (they
    /// restart on the target).
    ///
    /// A property of the type, not of a handler: the SDK sends its HELLO as soon as a link is
    /// accepted, before the daemon's HELLO arrives and before the factory makes the link's
    /// handler. An agent that wraps another forwards it (`Inner::movable()`).
    fn movable() -> bool
    where
        Self: Sized,
    {
        false
    }
    /// The session `s` is leaving this node (EXPORT, after a PAUSE): return its state. The SDK
    /// sends it and then nothing more for `s` (what is sent for it meanwhile is held). Don't
    /// end the session here: the move may still be called off (CONTINUE:
    /// [`Agent::resume_output`], and the session goes on here); it ends with
    /// [`Agent::close`] and [`CloseReason::Roamed`] once the target holds it. Stop producing
    /// output for it meanwhile (output held then is lost if the move completes).
    ///
    /// The default, [`Export::NotMovable`], answers the empty STATE at once.
    fn export(&mut self, s: SessionId) -> Export {
        let _ = s;
        Export::NotMovable
    }
    /// The session `s` moved here from another node: `state` is what the source's
    /// [`Agent::export`] returned (all of it; possibly empty). Called after [`Agent::open`]
    /// (with `info.reopen`) or [`Agent::rebind`] for the REOPEN, and before any DATA for `s`:
    /// restore the session's state from it. The default ignores it.
    fn import(&mut self, s: SessionId, state: Vec<u8>, out: &Outbox) {
        let _ = (s, state, out);
    }
}
