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
//! * malformed input closes the link with a warning, never a panic.
//!
//! The agents `claw-agent` runs are here too, ready to serve or to wrap: [`EchoAgent`],
//! [`ExecAgent`] (one process per session on pipes) and [`ShellAgent`] (a login shell in a PTY
//! per session, started with `posix_spawn`). Both serve all the sessions of a link from one
//! event-loop thread, at 2 (shell) or 3 (exec) descriptors and no thread per session — see
//! `docs/POD-LINK.md`, "How `shell` and `exec` run their sessions".
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

mod echo;
mod exec;
mod input;
mod link;
mod listener;
pub mod pty;
mod ptyloop;
mod shell;
mod signal;
#[cfg(test)]
mod testutil;

pub use echo::EchoAgent;
pub use exec::ExecAgent;
pub use input::{input_queue, InputReceiver, InputSender, INPUT_HARD_LIMIT, INPUT_HIGH, INPUT_LOW};
pub use link::{serve_link, Outbox, HELD_INPUT_PAUSE};
pub use listener::AgentListener;
pub use shell::{shell_path, ShellAgent};
pub use signal::stop_on_signals;

pub use clawterm_core::podlink::CloseReason;

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
    /// restarted, or the session roamed in). Its earlier state on this pod, if any, is gone.
    pub reopen: bool,
}

/// A link's handler: the SDK makes one per link (from the factory given to
/// [`AgentListener::serve`]) and calls it, from the link's own thread, for every session of
/// that link. Only [`Agent::data`] is required.
///
/// Calls for a session arrive between its `open` and its `close` (or `link_closed`); events
/// for unknown or already-closed sessions are dropped by the SDK. Don't block for long in
/// these methods: the whole link waits (hand slow work to a thread and reply via a clone of
/// the [`Outbox`]).
pub trait Agent {
    /// A session was opened (OPEN) or re-bound to this pod (REOPEN, `info.reopen`).
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
    /// The link is gone (EOF, error, protocol error or the server stopping): every session
    /// still open on it is gone too. Last call on this handler.
    fn link_closed(&mut self, out: &Outbox) {
        let _ = out;
    }
}
