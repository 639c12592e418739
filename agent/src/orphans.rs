//! Sessions that outlive their link: the daemon grace (POD-LINK.md §7).
//!
//! When a link ends without the daemon having closed a session (the daemon exited or crashed),
//! an [`AgentListener`](super::AgentListener) with a daemon grace asks the link's handler for
//! each such session's state ([`Agent::orphan`](super::Agent::orphan)) and keeps it, as an
//! [`Orphan`], in a listener-wide registry keyed by SESSION_ID. A REOPEN of that SESSION_ID on
//! any link of the listener within the grace hands the state to that link's handler
//! ([`Agent::rebind`](super::Agent::rebind)), together with the DATA the SDK was holding for
//! the session (the old daemon had PAUSEd it); an OPEN of it ends the orphan and opens afresh;
//! the end of the grace ends it (the orphan is dropped, which runs its end). One timer thread
//! per listener, no thread per orphan.

use std::any::Any;
use std::collections::{HashMap, VecDeque};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::SessionId;

/// The daemon grace of [`AgentListener`](super::AgentListener) (and of `claw-agent`) unless
/// set otherwise: a session whose link ended without a CLOSE is kept this long for a REOPEN.
pub const DEFAULT_DAEMON_GRACE: Duration = Duration::from_secs(60);

type State = Box<dyn Any + Send>;
type EndFn = Box<dyn FnOnce(State) + Send>;

/// What an agent keeps of a session whose link ended without a CLOSE for it, until a REOPEN
/// continues it ([`Orphan::downcast`] takes the state back) or it is given up: dropping an
/// `Orphan` (or [`Orphan::end`]) runs the end given to [`Orphan::new`], which should end the
/// session as a CLOSE would (kill its process, ...).
///
/// ```
/// use clawterm_agent::Orphan;
/// struct Repl { history: Vec<String> }
/// let o = Orphan::new(Repl { history: vec!["1+1".into()] }, |r| drop(r.history));
/// let back: Repl = o.downcast().ok().unwrap(); // the end does not run
/// assert_eq!(back.history, ["1+1"]);
/// ```
pub struct Orphan {
    state: Option<State>,
    end: Option<EndFn>,
}

impl Orphan {
    /// An orphan holding `state`; `end` runs if it is given up (dropped) instead of taken
    /// back. `end` runs on whichever thread drops it (the listener's timer thread when the
    /// grace runs out, a link thread for an OPEN of its id, the thread that stops the
    /// listener): don't block in it for long.
    pub fn new<T: Send + 'static>(state: T, end: impl FnOnce(T) + Send + 'static) -> Orphan {
        Orphan {
            state: Some(Box::new(state)),
            end: Some(Box::new(move |s: State| {
                if let Ok(t) = s.downcast::<T>() {
                    end(*t);
                }
            })),
        }
    }

    /// Whether the state is a `T`.
    pub fn is<T: 'static>(&self) -> bool {
        self.state.as_ref().is_some_and(|s| s.is::<T>())
    }

    /// Takes the state back to continue the session (the end does not run); the orphan itself
    /// if its state is not a `T`.
    pub fn downcast<T: 'static>(mut self) -> Result<T, Orphan> {
        match self.state.take().map(|s| s.downcast::<T>()) {
            Some(Ok(t)) => {
                self.end = None;
                Ok(*t)
            }
            Some(Err(s)) => {
                self.state = Some(s);
                Err(self)
            }
            None => Err(self),
        }
    }

    /// Gives the session up now: runs its end (what dropping it does).
    pub fn end(self) {
        drop(self);
    }
}

impl Drop for Orphan {
    fn drop(&mut self) {
        if let (Some(state), Some(end)) = (self.state.take(), self.end.take()) {
            end(state);
        }
    }
}

impl std::fmt::Debug for Orphan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Orphan").finish_non_exhaustive()
    }
}

/// An orphan as the registry keeps it.
pub(crate) struct Kept {
    pub(crate) orphan: Orphan,
    /// Encoded DATA the link's [`Outbox`](super::Outbox) held for the session (the daemon had
    /// it PAUSEd): sent first on the link that re-binds it.
    pub(crate) held: Vec<Vec<u8>>,
}

struct Entry {
    gen: u64,
    kept: Kept,
}

struct Inner {
    /// Taking orphans (false while the listener is not serving, or stopping).
    open: bool,
    entries: HashMap<SessionId, Entry>,
    /// (deadline, session, generation), in deadline order: every orphan gets the same grace,
    /// so insertion order is deadline order. Entries taken or replaced meanwhile are skipped.
    queue: VecDeque<(Instant, SessionId, u64)>,
    next_gen: u64,
}

/// The listener-wide registry of orphaned sessions, and its timer.
pub(crate) struct Orphans {
    grace: Duration,
    inner: Mutex<Inner>,
    cond: Condvar,
}

impl Orphans {
    pub(crate) fn new(grace: Duration) -> Orphans {
        Orphans {
            grace,
            inner: Mutex::new(Inner {
                open: false,
                entries: HashMap::new(),
                queue: VecDeque::new(),
                next_gen: 0,
            }),
            cond: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Only this module holds the lock, and it runs no foreign code (no orphan's end) under it.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn grace(&self) -> Duration {
        self.grace
    }

    /// Whether a link that ends now should hand its open sessions over.
    pub(crate) fn accepting(&self) -> bool {
        !self.grace.is_zero() && self.lock().open
    }

    /// Starts taking orphans (the listener serves).
    pub(crate) fn open(&self) {
        self.lock().open = true;
    }

    /// Keeps `s` for the grace. An orphan already kept under the same id (another link had a
    /// session with that id) is ended; so is this one if the registry does not take orphans.
    pub(crate) fn keep(&self, s: SessionId, orphan: Orphan, held: Vec<Vec<u8>>) {
        let kept = Kept { orphan, held };
        let mut inner = self.lock();
        if !inner.open || self.grace.is_zero() {
            drop(inner);
            drop(kept);
            return;
        }
        let gen = inner.next_gen;
        inner.next_gen += 1;
        let replaced = inner.entries.insert(s, Entry { gen, kept });
        let deadline = Instant::now() + self.grace;
        inner.queue.push_back((deadline, s, gen));
        let n = inner.entries.len();
        drop(inner);
        self.cond.notify_all();
        tracing::debug!(
            session = s,
            orphans = n,
            "link ended without a CLOSE: session kept for a REOPEN"
        );
        if replaced.is_some() {
            tracing::warn!(
                session = s,
                "two links ended with the same session id open; the older one is ended"
            );
        }
    }

    /// Takes `s` out of the registry (a REOPEN or OPEN of it arrived).
    pub(crate) fn take(&self, s: SessionId) -> Option<Kept> {
        self.lock().entries.remove(&s).map(|e| e.kept)
    }

    /// Sessions kept now.
    pub(crate) fn len(&self) -> usize {
        self.lock().entries.len()
    }

    /// Stops taking orphans and ends every one kept (the listener stops).
    pub(crate) fn close(&self) {
        let all: Vec<Entry> = {
            let mut inner = self.lock();
            inner.open = false;
            inner.queue.clear();
            inner.entries.drain().map(|(_, e)| e).collect()
        };
        self.cond.notify_all();
        if !all.is_empty() {
            tracing::info!(
                orphans = all.len(),
                "stopping: ending the sessions kept for a REOPEN"
            );
        }
        drop(all);
    }

    /// The timer: ends orphans whose grace is over, until [`Orphans::close`].
    pub(crate) fn run_timer(&self) {
        let mut inner = self.lock();
        loop {
            if !inner.open {
                return;
            }
            let now = Instant::now();
            let mut due = Vec::new();
            while let Some(&(t, s, gen)) = inner.queue.front() {
                if t > now {
                    break;
                }
                inner.queue.pop_front();
                if inner.entries.get(&s).is_some_and(|e| e.gen == gen) {
                    if let Some(e) = inner.entries.remove(&s) {
                        due.push((s, e));
                    }
                }
            }
            if !due.is_empty() {
                drop(inner);
                for (s, e) in due {
                    tracing::info!(
                        session = s,
                        grace = ?self.grace,
                        "no REOPEN within the daemon grace: ending the session"
                    );
                    drop(e);
                }
                inner = self.lock();
                continue;
            }
            inner = match inner.queue.front() {
                Some(&(t, _, _)) => {
                    self.cond
                        .wait_timeout(inner, t.saturating_duration_since(now))
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
                None => self.cond.wait(inner).unwrap_or_else(|e| e.into_inner()),
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    fn counted(ends: &Arc<AtomicUsize>, tag: u32) -> Orphan {
        let ends = Arc::clone(ends);
        Orphan::new(tag, move |_| {
            ends.fetch_add(1, Ordering::SeqCst);
        })
    }

    #[test]
    fn an_orphan_ends_when_dropped_and_not_when_taken_back() {
        let ends = Arc::new(AtomicUsize::new(0));
        drop(counted(&ends, 1));
        assert_eq!(ends.load(Ordering::SeqCst), 1);
        let o = counted(&ends, 2);
        assert!(o.is::<u32>() && !o.is::<String>());
        let o = o.downcast::<String>().expect_err("not a String");
        assert_eq!(o.downcast::<u32>().ok(), Some(2));
        assert_eq!(ends.load(Ordering::SeqCst), 1, "taken back: no end");
        counted(&ends, 3).end();
        assert_eq!(ends.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn the_registry_ends_orphans_at_the_grace_replaced_ones_and_all_on_close() {
        let ends = Arc::new(AtomicUsize::new(0));
        let reg = Arc::new(Orphans::new(Duration::from_millis(200)));
        // Closed: nothing is kept.
        reg.keep(1, counted(&ends, 1), Vec::new());
        assert_eq!((reg.len(), ends.load(Ordering::SeqCst)), (0, 1));
        reg.open();
        assert!(reg.accepting());
        let timer = {
            let reg = Arc::clone(&reg);
            std::thread::spawn(move || reg.run_timer())
        };
        reg.keep(1, counted(&ends, 1), vec![b"held".to_vec()]);
        reg.keep(2, counted(&ends, 2), Vec::new());
        // The same id again: the older one ends at once.
        reg.keep(2, counted(&ends, 22), Vec::new());
        assert_eq!((reg.len(), ends.load(Ordering::SeqCst)), (2, 2));
        // Taken back before the grace: not ended, and its held DATA comes with it.
        let k = reg.take(1).expect("kept");
        assert_eq!(k.held, vec![b"held".to_vec()]);
        assert_eq!(k.orphan.downcast::<u32>().ok(), Some(1));
        assert!(reg.take(1).is_none());
        // The grace ends 2 (the newer one).
        let t0 = Instant::now();
        while reg.len() > 0 {
            assert!(t0.elapsed() < Duration::from_secs(10), "not ended");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(ends.load(Ordering::SeqCst), 3);
        reg.keep(3, counted(&ends, 3), Vec::new());
        reg.close();
        assert_eq!((reg.len(), ends.load(Ordering::SeqCst)), (0, 4));
        assert!(!reg.accepting());
        timer.join().unwrap();
        // A zero grace never keeps anything.
        let zero = Orphans::new(Duration::ZERO);
        zero.open();
        assert!(!zero.accepting());
        zero.keep(5, counted(&ends, 5), Vec::new());
        assert_eq!((zero.len(), ends.load(Ordering::SeqCst)), (0, 5));
    }

    /// A third-party agent with state of its own (bytes seen per session): what `orphan`
    /// returns comes back to `rebind` on another link's handler; one not re-bound is ended when
    /// the listener stops.
    #[test]
    fn an_agents_own_session_state_moves_to_the_link_that_reopens_it() {
        use crate::testutil::{serial, Pod};
        use crate::{Agent, OpenInfo, Outbox};
        use std::collections::HashMap;
        use std::sync::Mutex;

        struct Counter {
            seen: HashMap<SessionId, usize>,
            log: Arc<Mutex<Vec<String>>>,
        }
        impl Agent for Counter {
            fn open(&mut self, s: SessionId, info: &OpenInfo, _out: &Outbox) {
                self.log
                    .lock()
                    .unwrap()
                    .push(format!("open {s} {}", info.reopen));
                self.seen.insert(s, 0);
            }
            fn data(&mut self, s: SessionId, bytes: &[u8], out: &Outbox) {
                if let Some(n) = self.seen.get_mut(&s) {
                    *n += bytes.len();
                    let _ = out.data(s, format!("[{n}]").as_bytes());
                }
            }
            fn orphan(&mut self, s: SessionId) -> Option<Orphan> {
                let n = self.seen.remove(&s)?;
                let log = Arc::clone(&self.log);
                Some(Orphan::new(n, move |n| {
                    log.lock().unwrap().push(format!("end {s} at {n}"));
                }))
            }
            fn rebind(&mut self, s: SessionId, info: &OpenInfo, orphan: Orphan, out: &Outbox) {
                match orphan.downcast::<usize>() {
                    Ok(n) => {
                        self.log.lock().unwrap().push(format!("rebind {s} at {n}"));
                        self.seen.insert(s, n);
                    }
                    Err(other) => {
                        drop(other);
                        self.open(s, info, out);
                    }
                }
            }
        }

        let _g = serial();
        let log = Arc::new(Mutex::new(Vec::new()));
        let pod = {
            let log = Arc::clone(&log);
            Pod::start(Duration::from_secs(60), move || Counter {
                seen: HashMap::new(),
                log: Arc::clone(&log),
            })
        };
        let mut d = pod.connect();
        d.open(1);
        d.open(2);
        d.input(1, "abc");
        d.input(2, "de");
        d.wait_for(1, "[3]");
        d.wait_for(2, "[2]");
        d.drop_link();
        pod.wait_orphans(2);
        let mut d = pod.connect();
        d.reopen(1);
        d.input(1, "xyz");
        d.wait_for(1, "[6]");
        d.reopen(7); // unknown: open, as after a pod restart
        d.input(7, "q");
        d.wait_for(7, "[1]");
        assert_eq!(pod.orphans(), 1);
        d.drop_link();
        pod.wait_orphans(3); // 2, and now 1 and 7 again
        pod.stop();
        let mut log = log.lock().unwrap().clone();
        log[4..].sort();
        assert_eq!(
            log,
            [
                "open 1 false",
                "open 2 false",
                "rebind 1 at 3",
                "open 7 true",
                "end 1 at 6",
                "end 2 at 2",
                "end 7 at 1",
            ]
        );
    }
}
