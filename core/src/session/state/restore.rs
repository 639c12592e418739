//! Rebuilding a session from a state journal: a record (see [`Session::write_meta_record`])
//! followed by what happened to the session after it — output frames, counters — replayed in
//! order. Used when a clawtermd restarts (or crashed) on a state dir: every session comes back
//! SUSPENDED, its ring holding every frame the client has not acknowledged.

use super::{Session, State, HAS_ACKED, HAS_DROPPED, INPUT_PAUSED, POD_PAUSED};
use crate::proto::seq;

impl Session {
    /// Takes `meta`'s ids, token, counters, flags and timers, keeping this session's ring (and
    /// what it says was dropped, when it knows more): a later record of the same session whose
    /// output was journaled frame by frame.
    pub fn apply_meta(&mut self, meta: Session) {
        let ring = std::mem::take(&mut self.ring);
        let (had_drop, dropped) = (self.flags & HAS_DROPPED != 0, self.dropped_through);
        let keep_seq = self.next_seq;
        *self = meta;
        self.ring = ring;
        if had_drop && (self.flags & HAS_DROPPED == 0 || seq::gt(dropped, self.dropped_through)) {
            self.flags |= HAS_DROPPED;
            self.dropped_through = dropped;
        }
        if seq::gt(keep_seq, self.next_seq) {
            self.next_seq = keep_seq;
        }
    }

    /// A journaled output frame: `piece` with SEQ `seq`, kept in the ring (dropping the oldest
    /// frames past `cap`, which the next RESUMED reports as a GAP). A frame not newer than the
    /// SEQ the session has already used (older than its next SEQ) is ignored: a journal is
    /// replayed in order, so that frame is already accounted for.
    pub fn restore_output(&mut self, seq: u32, piece: &[u8], cap: usize) {
        if seq::gt(self.next_seq, seq) {
            return;
        }
        if self.flags & HAS_ACKED != 0 && !seq::gt(seq, self.acked_through) {
            self.next_seq = seq.wrapping_add(1);
            return; // acknowledged already
        }
        let d = self.ring.push(seq, piece, cap);
        if d.frames > 0
            && (self.flags & HAS_DROPPED == 0 || seq::gt(d.last_seq, self.dropped_through))
        {
            self.dropped_through = d.last_seq;
            self.flags |= HAS_DROPPED;
        }
        self.next_seq = seq.wrapping_add(1);
    }

    /// Journaled counters: the next SEQ the server will use (never moved back), the newest
    /// client DATA SEQ received, and the newest server SEQ the client acknowledged (`None`:
    /// none yet), whose frames leave the ring.
    pub fn restore_counters(&mut self, next_seq: u32, last_client_seq: u32, acked: Option<u32>) {
        if seq::gt(next_seq, self.next_seq) {
            self.next_seq = next_seq;
        }
        self.last_client_seq = last_client_seq;
        if let Some(a) = acked {
            self.ring.remove_through(a);
            self.note_acked(a);
        }
    }

    /// The newest server SEQ the client acknowledged, if any (what a journal records).
    pub fn acked(&self) -> Option<u32> {
        (self.flags & HAS_ACKED != 0).then_some(self.acked_through)
    }

    /// The pod link this session's flow control was agreed on is gone (a new one starts
    /// unpaused both ways).
    pub fn clear_pod_flow(&mut self) {
        self.flags &= !(POD_PAUSED | INPUT_PAUSED);
    }

    /// After a restart: the connection and the old pod link are gone, so the session is
    /// SUSPENDED since `now` (its suspend TTL starts again), with no flow-control state of
    /// either (the new link starts unpaused; the overflow policy pauses it again if the ring
    /// is full). A CLOSED session stays closed.
    pub fn restored(&mut self, now: u64) {
        if self.state != State::Closed {
            self.state = State::Suspended;
        }
        self.forget_connection();
        self.clear_pod_flow();
        self.last_rx = now;
        self.last_tx = now;
        self.armed = 0;
    }
}
