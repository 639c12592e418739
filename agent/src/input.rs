//! A session's bounded input queue, with the pod link's input flow control (POD-LINK.md §4).
//!
//! An agent that hands input to something slower than the link (a program's stdin or
//! terminal) must not read the link more slowly — that would stall every session on it — and
//! must not buffer without bound. [`input_queue`] gives it a queue that asks the daemon to
//! PAUSE the session's input once [`INPUT_HIGH`] bytes wait and to CONTINUE once they drained
//! below [`INPUT_LOW`]; the daemon then stops reading that one client, whose TCP pushes back on
//! it, and the link's other sessions go on.
//!
//! ```no_run
//! # use clawterm_agent::{input_queue, Outbox, SessionId};
//! # fn f(s: SessionId, out: &Outbox, mut stdin: std::process::ChildStdin) {
//! use std::io::Write;
//! let (mut tx, rx) = input_queue(s, out);
//! std::thread::spawn(move || {
//!     while let Some(chunk) = rx.recv() {
//!         let _ = stdin.write_all(&chunk);
//!         rx.done(chunk.len()); // may CONTINUE the session's input
//!     }
//! });
//! tx.push(b"ls\n"); // from Agent::data, on the link thread: never blocks
//! # }
//! ```

use super::{Outbox, SessionId};
use crossbeam_channel::{Receiver, Sender};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

/// Queued input beyond which the session's input is PAUSEd.
pub const INPUT_HIGH: usize = 256 * 1024;
/// Queued input below which a paused session's input is CONTINUEd.
pub const INPUT_LOW: usize = 64 * 1024;
/// Input still arriving after PAUSE (what was in flight: the daemon's queue for the link and
/// the socket buffers) is queued up to this much; beyond it — a daemon that ignores PAUSE —
/// input is discarded with a warning rather than held without bound.
pub const INPUT_HARD_LIMIT: usize = 4 << 20;

struct Shared {
    queued: AtomicUsize,
    /// PAUSE asked of the daemon (and no CONTINUE since).
    paused: AtomicBool,
}

/// The agent's end (on the link thread): [`InputSender::push`] never blocks.
pub struct InputSender {
    s: SessionId,
    out: Outbox,
    tx: Sender<Vec<u8>>,
    shared: Arc<Shared>,
    /// Bytes discarded past [`INPUT_HARD_LIMIT`] (warned once per episode).
    discarded: u64,
}

/// The consumer's end (e.g. a thread writing to a program): take chunks with
/// [`InputReceiver::recv`] (or select on [`InputReceiver::channel`]) and call
/// [`InputReceiver::done`] once each is consumed.
pub struct InputReceiver {
    s: SessionId,
    out: Outbox,
    rx: Receiver<Vec<u8>>,
    shared: Arc<Shared>,
}

/// A bounded input queue for session `s`, pausing and continuing its input through `out`.
pub fn input_queue(s: SessionId, out: &Outbox) -> (InputSender, InputReceiver) {
    let (tx, rx) = crossbeam_channel::unbounded();
    let shared = Arc::new(Shared {
        queued: AtomicUsize::new(0),
        paused: AtomicBool::new(false),
    });
    (
        InputSender {
            s,
            out: out.clone(),
            tx,
            shared: shared.clone(),
            discarded: 0,
        },
        InputReceiver {
            s,
            out: out.clone(),
            rx,
            shared,
        },
    )
}

impl InputSender {
    /// Queues `bytes`; PAUSEs the session's input once more than [`INPUT_HIGH`] bytes wait.
    pub fn push(&mut self, bytes: &[u8]) {
        let queued = self.shared.queued.load(Ordering::SeqCst);
        if queued.saturating_add(bytes.len()) > INPUT_HARD_LIMIT && queued > 0 {
            if self.discarded == 0 {
                tracing::warn!(
                    session = self.s,
                    queued,
                    "input keeps arriving after PAUSE; discarding it"
                );
            }
            self.discarded = self.discarded.saturating_add(bytes.len() as u64);
            return;
        }
        self.discarded = 0;
        let now = self.shared.queued.fetch_add(bytes.len(), Ordering::SeqCst) + bytes.len();
        if self.tx.send(bytes.to_vec()).is_err() {
            // The consumer is gone (the program closed its input or exited).
            self.shared.queued.fetch_sub(bytes.len(), Ordering::SeqCst);
            return;
        }
        if now > INPUT_HIGH && !self.shared.paused.swap(true, Ordering::SeqCst) {
            let _ = self.out.pause_input(self.s);
        }
    }

    /// Bytes waiting for the consumer.
    pub fn queued(&self) -> usize {
        self.shared.queued.load(Ordering::SeqCst)
    }
}

impl InputReceiver {
    /// The next chunk; `None` once the sender is gone (the session is over).
    pub fn recv(&self) -> Option<Vec<u8>> {
        self.rx.recv().ok()
    }

    /// The channel, for `crossbeam_channel::select!`.
    pub fn channel(&self) -> &Receiver<Vec<u8>> {
        &self.rx
    }

    /// A chunk of `n` bytes was consumed (or given up): CONTINUEs a paused session's input
    /// once less than [`INPUT_LOW`] bytes wait.
    pub fn done(&self, n: usize) {
        let left = self
            .shared
            .queued
            .fetch_sub(n, Ordering::SeqCst)
            .saturating_sub(n);
        if left < INPUT_LOW && self.shared.paused.swap(false, Ordering::SeqCst) {
            let _ = self.out.resume_input(self.s);
        }
    }
}
