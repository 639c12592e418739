//! The shard's side of the state dir: what it journals as it works, the sessions it takes back
//! at start-up, and the journal's rewrite. See `docs/STATE.md`.
//!
//! Ordering: an entry is journaled before what it describes leaves the shard (output before it
//! is written to the client, counters before the batch's input goes to the pod), so a crash
//! between the two repeats nothing and loses nothing the shard had written.

use super::{ShardHandler, ShardMsg};
use crate::server::metrics::ShardMetrics;
use crate::session::Session;
use crate::state::{wall_ms, Journal};
use shards::Context;
use std::collections::BTreeMap;
use tracing::{error, info, warn};

/// What a shard gets from the state dir at start-up.
#[derive(Default)]
pub struct Restore {
    /// Its sessions, as session records.
    pub records: Vec<Vec<u8>>,
    /// Its journal (`None`: no state dir).
    pub journal: Option<Journal>,
    /// A live upgrade: the connections and links the old process handed over (the sessions
    /// are `records`, as they were there).
    pub moved: Option<Moved>,
    /// Client input held for pods that were away, sent after their REOPENs.
    pub held: crate::state::Held,
    /// The new process of a live upgrade: the shard's part of the hand-over comes later
    /// ([`super::ShardMsg::TakeOver`]); connections other shards hand it meanwhile wait.
    pub awaiting: bool,
}

/// Connections and pod links handed over to a shard by the process it replaces.
#[derive(Debug, Default)]
pub struct Moved {
    pub conns: Vec<crate::upgrade::MovedConn>,
    pub links: Vec<crate::upgrade::MovedLink>,
}

impl ShardHandler {
    /// A journal write failed (the state dir's file system is full, say): sessions go on in
    /// memory, but no longer outlive the process. Said once, loudly, and counted.
    pub(super) fn journal_failed(&mut self, e: std::io::Error) {
        if let Some(j) = self.journal.take() {
            error!(
                file = %j.path().display(),
                error = %e,
                "state journal write failed; this shard's sessions no longer survive a restart"
            );
            j.set_aside();
            ShardMetrics::inc(&self.m().state_errors, 1);
        }
    }

    /// Journals a session's ids, counters and flags.
    pub(super) fn persist_meta(&mut self, ctx: &impl Context<ShardMsg>, sid: u32) {
        let now = self.now(ctx);
        let (Some(j), Some(s)) = (self.journal.as_mut(), self.table.get(sid)) else {
            return;
        };
        if let Err(e) = j.meta(s, now, wall_ms()) {
            self.journal_failed(e);
        }
    }

    /// Journals a session's counters.
    pub(super) fn persist_counters(&mut self, sid: u32) {
        let (Some(j), Some(s)) = (self.journal.as_mut(), self.table.get(sid)) else {
            return;
        };
        if let Err(e) = j.counters(s) {
            self.journal_failed(e);
        }
    }

    /// Journals agent output the session numbered from `first_seq`.
    pub(super) fn persist_output(&mut self, sid: u32, first_seq: u32, data: &[u8]) {
        let piece = self.shared.cfg.session.send_payload();
        let Some(j) = self.journal.as_mut() else {
            return;
        };
        if let Err(e) = j.output(sid, first_seq, data, piece) {
            self.journal_failed(e);
        }
    }

    /// Journals the input held for a pod that is away (SIGTERM: the next daemon sends it after
    /// the REOPENs), or that nothing is held any more (empty: the link is up).
    pub(super) fn persist_held(&mut self, key: (u32, u32), bytes: &[u8]) {
        let Some(j) = self.journal.as_mut() else {
            return;
        };
        if let Err(e) = j.held(key, bytes) {
            self.journal_failed(e);
        }
    }

    /// Journals the end of a session.
    pub(super) fn persist_end(&mut self, sid: u32) {
        let Some(j) = self.journal.as_mut() else {
            return;
        };
        if let Err(e) = j.end(sid) {
            self.journal_failed(e);
        }
    }

    /// Rewrites the journal when it has grown enough (at the end of a turn).
    pub(super) fn maybe_compact(&mut self, ctx: &impl Context<ShardMsg>) {
        if !self.journal.as_ref().is_some_and(|j| j.wants_compaction()) {
            return;
        }
        let now = self.now(ctx);
        let started = std::time::Instant::now();
        let Some(j) = self.journal.as_mut() else {
            return;
        };
        let before = j.len();
        match j.compact(self.table.iter(), now, wall_ms()) {
            Ok(after) => {
                info!(
                    before,
                    after,
                    sessions = self.table.len(),
                    took_ms = started.elapsed().as_millis() as u64,
                    "state journal rewritten"
                );
                ShardMetrics::inc(&self.m().state_compactions, 1);
            }
            Err(e) => self.journal_failed(e),
        }
    }

    /// Takes the sessions restored from the state dir: each SUSPENDED (its client RESUMEs),
    /// and waiting for its pod like after a pod loss, so the pod is sent REOPEN as soon as its
    /// link is up (at once when its socket is there).
    pub(super) fn restore_sessions(&mut self, ctx: &mut impl Context<ShardMsg>) {
        let records = std::mem::take(&mut self.restore_records);
        if records.is_empty() {
            return;
        }
        let now = self.now(ctx);
        let wall = wall_ms();
        let grace = self.shared.cfg.agent_grace_ms;
        let mut by_pod: BTreeMap<(u32, u32), Vec<u32>> = BTreeMap::new();
        let mut restored = 0usize;
        for rec in records {
            let mut s = match Session::from_record(&rec, now, wall) {
                Ok((s, _)) => s,
                Err(e) => {
                    // Written by this process's own start-up a moment ago: cannot happen
                    // unless memory is corrupt. Counted and said, never silent.
                    error!(error = %e, "restored session record unreadable; session lost");
                    ShardMetrics::inc(&self.m().state_errors, 1);
                    continue;
                }
            };
            s.restored(now);
            let sid = s.id();
            let key = (s.tenant(), s.agent());
            // A session its agent closed waits only for its client (replay, then DISCONNECT):
            // its pod is not asked to take it back.
            let needs_pod = !s.agent_closed();
            // Counted like a created session (the limits apply to restored ones too).
            self.shared
                .sessions
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if self.table.insert(s).is_none() {
                warn!(
                    session = sid,
                    "restored session id twice; keeping the first"
                );
                self.shared.release_session();
                continue;
            }
            if needs_pod {
                by_pod.entry(key).or_default().push(sid);
            }
            self.arm(ctx, sid);
            restored += 1;
        }
        for (key, sids) in by_pod {
            let action = self.links.restore(key, sids, now, grace);
            if let Some(h) = self.restore_held.remove(&key) {
                self.links.restore_held(key, &h);
            }
            self.apply_link_actions(ctx, key, vec![action]);
            if self.shared.pod_present(key.0, key.1) {
                self.pod_added(ctx, key);
            }
        }
        info!(sessions = restored, "sessions restored from the state dir");
    }
}
