//! One session's state machine (PROTOCOL.md §3–§4, POD-LINK.md §4).
//!
//! A [`Session`] is driven by method calls — a client frame, agent output, a timer, the loss of
//! the connection, a RESUME — each with the current time in milliseconds. Effects go to a
//! [`Sink`]: encoded frames for the attached client connection and pod-link messages for the
//! agent. What the connection should do next comes back as a [`Flow`].

use super::config::{Overflow, SessionConfig};
use super::ring::ReplayRing;
use crate::podlink::{CloseReason, Msg as PodMsg, Open};
use crate::proto::{
    self, frame::encode_with, payload::ErrorFrame, seq, Ack, ErrorCode, Frame, FrameType, Resize,
    Resumed, CAP_RELIABLE,
};

/// Where a session's effects go.
pub trait Sink {
    /// The buffer of bytes to write to the attached client connection.
    fn client(&mut self) -> &mut Vec<u8>;
    /// Sends a pod-link message for this session to its agent.
    fn pod(&mut self, session_id: u32, msg: PodMsg<'_>);
    /// A flow-control event worth counting (metrics); ignored unless overridden.
    fn flow(&mut self, _ev: FlowEvent) {}
    /// A whole frame was written to [`Sink::client`] (an ERROR frame with its code), so a
    /// sink counts frames where they are made instead of parsing its bytes again; ignored
    /// unless overridden.
    fn frame_written(&mut self, _error: Option<ErrorCode>) {}
}

/// Flow-control events a [`Sink`] may count (PROTOCOL.md §7.16).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum FlowEvent {
    /// The attached connection was found not to acknowledge what it had received: from now on
    /// it is paced by its send backlog and its ring drops the oldest frames at its cap.
    Unacknowledged,
    /// Frames dropped from the ring unacknowledged while a client was attached.
    DroppedAttached(u32),
    /// Frames dropped from the ring while the session was suspended.
    DroppedSuspended(u32),
}

/// Session states (§4).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum State {
    /// A connection is bound.
    Attached,
    /// No connection; output keeps flowing into the ring until the suspend TTL.
    Suspended,
    /// Finished: the session should be removed from its table.
    Closed,
}

/// What the connection (if any) should do after an event.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Flow {
    /// Keep going.
    Continue,
    /// Flush what was written to the client, then close the connection; the session is now
    /// SUSPENDED with its ring intact.
    Suspend,
    /// Flush, close the connection, and remove the session: it is CLOSED.
    Close,
}

/// Where a resumed client wants the replay to start.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum ResumeFrom {
    /// 24-byte RESUME: the highest server SEQ the client holds.
    LastSeq(u32),
    /// Legacy 4-byte RESUME: replay everything unacknowledged.
    Unacknowledged,
}

// Bits of `Session::flags`.
const ACK_PENDING: u16 = 0x01;
const HAS_DROPPED: u16 = 0x02;
const POD_PAUSED: u16 = 0x04;
const AGENT_CLOSED: u16 = 0x08;
const HAS_ACKED: u16 = 0x10;
const AGENT_GONE: u16 = 0x20;
/// The attached connection does not acknowledge: it is paced by its send backlog, and the ring
/// drops its oldest frames at `ring_bytes` (PROTOCOL.md §7.16). Cleared with the connection.
const UNACKED: u16 = 0x40;
/// The pod PAUSEd this session's input: its client is not read until the pod's CONTINUE.
const INPUT_PAUSED: u16 = 0x80;
/// The last delivery check found everything sent delivered, and no ACK has come since.
const DELIVERED: u16 = 0x100;
/// Every flag bit above (a session record with any other bit set is refused).
const FLAGS_KNOWN: u16 = ACK_PENDING
    | HAS_DROPPED
    | POD_PAUSED
    | AGENT_CLOSED
    | HAS_ACKED
    | AGENT_GONE
    | UNACKED
    | INPUT_PAUSED
    | DELIVERED;

mod record;
mod restore;
pub use record::{RecordError, MAGIC as RECORD_MAGIC, VERSION as RECORD_VERSION};

/// One session. Kept small: this is what every idle session costs in the table.
pub struct Session {
    id: u32,
    tenant: u32,
    agent: u32,
    /// SEQ the next frame sent will take.
    next_seq: u32,
    /// Highest (most recent) SEQ of a client DATA frame received.
    last_client_seq: u32,
    /// Newest SEQ dropped from the ring unacknowledged (valid with HAS_DROPPED).
    dropped_through: u32,
    /// Newest SEQ acknowledged by the client (valid with HAS_ACKED).
    acked_through: u32,
    /// SEQs of the frames sent on the current connection that overflow dropped before they
    /// were acknowledged, oldest first: empty ACKs count these first, a cumulative ACK
    /// removes those it covers. Allocated only when that happens (an agent ignoring PAUSE past
    /// the hard cap); `None` otherwise. Boxed so that an idle session pays 8 bytes for it,
    /// not a `VecDeque`'s 32.
    #[allow(clippy::box_collection)]
    conn_dropped: Option<Box<std::collections::VecDeque<u32>>>,
    caps: u8,
    state: State,
    flags: u16,
    resume_token: [u8; 16],
    ring: ReplayRing,
    /// Last time anything was received (attached), or the time of suspension (suspended).
    last_rx: u64,
    /// Last time anything was sent to the client.
    last_tx: u64,
    /// Next delivery check while the agent is paused by a full ring and the client is attached
    /// (0 = none): see [`Session::on_delivery`].
    ack_check: u64,
    /// Deadline of the timer entry the owner filed last (0 = none); lets the owner ignore
    /// stale wheel entries.
    pub armed: u64,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("id", &self.id)
            .field("tenant", &self.tenant)
            .field("agent", &self.agent)
            .field("state", &self.state)
            .field("next_seq", &self.next_seq)
            .field("last_client_seq", &self.last_client_seq)
            .field("ring_frames", &self.ring.len())
            .finish_non_exhaustive()
    }
}

impl Session {
    /// A new ATTACHED session (CONNECT accepted). Call [`Session::accept`] next.
    pub fn new(
        id: u32,
        tenant: u32,
        agent: u32,
        caps: u8,
        resume_token: [u8; 16],
        now: u64,
    ) -> Session {
        Session {
            id,
            tenant,
            agent,
            next_seq: 1,
            last_client_seq: 0,
            dropped_through: 0,
            acked_through: 0,
            conn_dropped: None,
            caps,
            state: State::Attached,
            flags: 0,
            resume_token,
            ring: ReplayRing::new(),
            last_rx: now,
            last_tx: now,
            ack_check: 0,
            armed: 0,
        }
    }

    /// Continues the server's SEQ counter from `next_seq` (a session restored from elsewhere,
    /// e.g. roamed in; also lets tests exercise the wrap).
    pub fn with_next_seq(mut self, next_seq: u32) -> Session {
        self.next_seq = next_seq;
        self
    }

    /// The session id.
    pub fn id(&self) -> u32 {
        self.id
    }
    /// Tenant id.
    pub fn tenant(&self) -> u32 {
        self.tenant
    }
    /// Agent id.
    pub fn agent(&self) -> u32 {
        self.agent
    }
    /// The client's capability bits, from its CONNECT.
    pub fn caps(&self) -> u8 {
        self.caps
    }
    /// Current state.
    pub fn state(&self) -> State {
        self.state
    }
    /// The 128-bit resume token sent in ACCEPT.
    pub fn resume_token(&self) -> &[u8; 16] {
        &self.resume_token
    }
    /// The replay ring.
    pub fn ring(&self) -> &ReplayRing {
        &self.ring
    }
    /// SEQ the next frame will take.
    pub fn next_seq(&self) -> u32 {
        self.next_seq
    }
    /// Highest (most recent) SEQ of a client DATA frame received (0 if none).
    pub fn last_client_seq(&self) -> u32 {
        self.last_client_seq
    }
    /// The agent has been asked to PAUSE.
    pub fn pod_paused(&self) -> bool {
        self.flags & POD_PAUSED != 0
    }
    /// The pod has PAUSEd this session's input (POD-LINK.md §4): its client should not be
    /// read until the pod's CONTINUE.
    pub fn input_paused(&self) -> bool {
        self.flags & INPUT_PAUSED != 0
    }
    /// The attached connection is paced by its send backlog rather than by ACKs
    /// (PROTOCOL.md §7.16).
    pub fn unacknowledged(&self) -> bool {
        self.flags & UNACKED != 0
    }
    /// The agent closed the session (output may still wait in the ring for the client).
    pub fn agent_closed(&self) -> bool {
        self.flags & AGENT_CLOSED != 0
    }
    fn reliable(&self) -> bool {
        self.caps & CAP_RELIABLE != 0
    }

    fn take_seq(&mut self) -> u32 {
        let s = self.next_seq;
        self.next_seq = self.next_seq.wrapping_add(1);
        s
    }

    /// Writes a frame with the next SEQ to the client.
    fn send(
        &mut self,
        ty: FrameType,
        flags: u8,
        now: u64,
        sink: &mut impl Sink,
        payload: impl FnOnce(&mut Vec<u8>),
    ) {
        let s = self.take_seq();
        encode_with(sink.client(), self.id, s, ty, flags, payload);
        self.last_tx = now;
        if ty != FrameType::Error {
            sink.frame_written(None);
        }
    }

    /// Writes an ERROR frame with the next SEQ to the client.
    fn send_error(&mut self, code: ErrorCode, now: u64, sink: &mut impl Sink) {
        self.send(FrameType::Error, 0, now, sink, |o| {
            ErrorFrame::encode_parts(code, code.message(), o)
        });
        sink.frame_written(Some(code));
    }

    /// Sends ACCEPT (SEQ 1) and OPEN to the agent.
    pub fn accept(&mut self, server_caps: u8, peer: &str, now: u64, sink: &mut impl Sink) {
        let (id, token) = (self.id, self.resume_token);
        self.send(FrameType::Accept, 0, now, sink, |o| {
            proto::Accept {
                session_id: id,
                version: proto::VERSION,
                caps: server_caps,
                resume_token: Some(token),
            }
            .encode(o)
        });
        sink.pod(
            self.id,
            PodMsg::Open(Open {
                tenant: self.tenant,
                agent: self.agent,
                client_caps: self.caps,
                peer,
            }),
        );
    }

    /// Sends an ERROR on the attached connection and suspends the session (§6: bad input never
    /// costs data). Returns [`Flow::Suspend`].
    pub fn fail(
        &mut self,
        code: ErrorCode,
        now: u64,
        cfg: &SessionConfig,
        sink: &mut impl Sink,
    ) -> Flow {
        if self.state == State::Attached {
            self.send_error(code, now, sink);
            self.detach(now, cfg, sink);
        }
        Flow::Suspend
    }

    /// Handles one frame from the attached client.
    pub fn on_client_frame(
        &mut self,
        f: &Frame<'_>,
        now: u64,
        cfg: &SessionConfig,
        sink: &mut impl Sink,
    ) -> Flow {
        if self.state != State::Attached {
            return Flow::Suspend;
        }
        if f.session_id != self.id {
            return self.fail(ErrorCode::ProtocolViolation, now, cfg, sink);
        }
        match f.ty {
            FrameType::Data => {
                self.last_rx = now;
                self.last_client_seq = f.seq;
                if self.reliable() {
                    self.flags |= ACK_PENDING;
                }
                sink.pod(self.id, PodMsg::Data(f.payload));
                Flow::Continue
            }
            FrameType::Ack => match Ack::parse(f.payload) {
                Ok(ack) => {
                    self.last_rx = now;
                    self.on_ack(ack, cfg, sink);
                    Flow::Continue
                }
                Err(e) => self.fail(e.code, now, cfg, sink),
            },
            FrameType::Resize => match Resize::parse(f.payload) {
                Ok(r) => {
                    self.last_rx = now;
                    sink.pod(
                        self.id,
                        PodMsg::Resize {
                            cols: r.cols,
                            rows: r.rows,
                        },
                    );
                    Flow::Continue
                }
                Err(e) => self.fail(e.code, now, cfg, sink),
            },
            FrameType::Keepalive | FrameType::Nack | FrameType::Unknown(_) => {
                // Never answer a KEEPALIVE with a KEEPALIVE; NACK is reserved; unknown types are
                // ignored (the caller counts them).
                self.last_rx = now;
                Flow::Continue
            }
            FrameType::Suspend => {
                self.detach(now, cfg, sink);
                Flow::Suspend
            }
            FrameType::Disconnect => {
                self.close(CloseReason::ClientDisconnect, sink);
                Flow::Close
            }
            FrameType::Connect
            | FrameType::Resume
            | FrameType::Accept
            | FrameType::Resumed
            | FrameType::Roam
            | FrameType::Error => self.fail(ErrorCode::ProtocolViolation, now, cfg, sink),
        }
    }

    /// Called once after a batch of client input: coalesced cumulative ACK for RELIABLE clients.
    pub fn end_batch(&mut self, now: u64, sink: &mut impl Sink) {
        if self.flags & ACK_PENDING != 0 && self.state == State::Attached {
            self.flags &= !ACK_PENDING;
            let s = self.last_client_seq;
            self.send(FrameType::Ack, 0, now, sink, |o| {
                Ack::Cumulative(s).encode(o)
            });
        }
    }

    fn on_ack(&mut self, ack: Ack, cfg: &SessionConfig, sink: &mut impl Sink) {
        // The client acknowledges: a delivery check waits a full ACK_WAIT again.
        self.flags &= !DELIVERED;
        match ack {
            Ack::Empty => {
                let dropped = self.conn_dropped.as_mut().and_then(|q| q.pop_front());
                if let Some(s) = dropped {
                    self.note_acked(s);
                    if self.conn_dropped.as_ref().is_some_and(|q| q.is_empty()) {
                        self.conn_dropped = None;
                    }
                } else if let Some((s, _)) = self.ring.pop_front() {
                    self.note_acked(s);
                }
            }
            Ack::Cumulative(through) => {
                if let Some(q) = self.conn_dropped.as_mut() {
                    while q.front().is_some_and(|&s| seq::le(s, through)) {
                        q.pop_front();
                    }
                    if q.is_empty() {
                        self.conn_dropped = None;
                    }
                }
                while let Some(s) = self.ring.front_seq() {
                    if !seq::le(s, through) {
                        break;
                    }
                    self.ring.pop_front();
                    self.note_acked(s);
                }
                // Everything up to `through` is acknowledged, frames overflow dropped alike
                // (even when none still in the ring is that old): a later legacy RESUME must
                // not report those as a GAP.
                if seq::gt(self.next_seq, through) {
                    self.note_acked(through);
                }
            }
        }
        self.maybe_continue(cfg, sink);
    }

    fn note_acked(&mut self, s: u32) {
        if self.flags & HAS_ACKED == 0 || seq::gt(s, self.acked_through) {
            self.acked_through = s;
        }
        self.flags |= HAS_ACKED;
    }

    /// CONTINUE once ACKs have drained the ring below half (a ring pause; an unacknowledging
    /// connection's pause is lifted by its send backlog instead).
    fn maybe_continue(&mut self, cfg: &SessionConfig, sink: &mut impl Sink) {
        if self.flags & (POD_PAUSED | UNACKED) == POD_PAUSED
            && self.ring.payload_bytes() < cfg.ring_bytes / 2
        {
            self.flags &= !(POD_PAUSED | DELIVERED);
            self.ack_check = 0;
            sink.pod(self.id, PodMsg::Continue);
        }
    }

    fn note_dropped(&mut self, d: super::ring::Dropped, sink: &mut impl Sink) {
        if d.frames == 0 {
            return;
        }
        sink.flow(if self.state == State::Attached {
            FlowEvent::DroppedAttached(d.frames)
        } else {
            FlowEvent::DroppedSuspended(d.frames)
        });
        if self.flags & HAS_DROPPED == 0 || seq::gt(d.last_seq, self.dropped_through) {
            self.dropped_through = d.last_seq;
        }
        self.flags |= HAS_DROPPED;
    }

    /// Output from the agent: split to the maximum payload, numbered, kept in the ring and, when
    /// attached, written to the client. May ask the agent to PAUSE (§4 flow control).
    pub fn on_agent_data(
        &mut self,
        data: &[u8],
        now: u64,
        cfg: &SessionConfig,
        sink: &mut impl Sink,
    ) {
        if self.state == State::Closed || self.agent_closed() {
            return;
        }
        let attached = self.state == State::Attached;
        // Acknowledging clients and the pause policy never lose data to the soft cap: the agent
        // is paused instead, and only output past the hard cap (an agent ignoring PAUSE) is
        // dropped. A connection that does not acknowledge (§7.16) keeps the newest `ring_bytes`
        // like a suspended session; its send backlog paces the agent.
        let lossless = if attached {
            self.flags & UNACKED == 0
        } else {
            cfg.overflow == Overflow::Pause
        };
        let cap = if lossless {
            cfg.hard_ring_bytes()
        } else {
            cfg.ring_bytes
        };
        for piece in data.chunks(cfg.send_payload()) {
            let s = self.take_seq();
            let d = if attached {
                // Frames the client was sent: empty ACKs still count them (§2.5).
                let q = &mut self.conn_dropped;
                self.ring.push_noting(s, piece, cap, |seq| {
                    q.get_or_insert_with(Default::default).push_back(seq)
                })
            } else {
                self.ring.push(s, piece, cap)
            };
            self.note_dropped(d, sink);
            if attached {
                encode_with(sink.client(), self.id, s, FrameType::Data, 0, |o| {
                    o.extend_from_slice(piece)
                });
                sink.frame_written(None);
                self.last_tx = now;
            }
        }
        if lossless && self.flags & POD_PAUSED == 0 && self.ring.payload_bytes() >= cfg.ring_bytes {
            self.flags |= POD_PAUSED;
            sink.pod(self.id, PodMsg::Pause);
            self.arm_delivery_check(now, cfg);
        }
    }

    /// Under `--overflow drop`, an attached client whose full ring paused the agent is checked
    /// every `ack_wait_ms` until it acknowledges or turns out not to (§7.16).
    fn arm_delivery_check(&mut self, now: u64, cfg: &SessionConfig) {
        if self.state == State::Attached
            && self.flags & (POD_PAUSED | UNACKED) == POD_PAUSED
            && cfg.overflow == Overflow::Drop
        {
            self.flags &= !DELIVERED;
            self.ack_check = now + cfg.ack_wait_ms.max(1);
        }
    }

    /// When the owner should next call [`Session::on_delivery`] (`None`: no check pending).
    pub fn delivery_check(&self) -> Option<u64> {
        (self.ack_check != 0).then_some(self.ack_check)
    }

    /// A delivery check (PROTOCOL.md §7.16), due at [`Session::delivery_check`]: `delivered`
    /// says whether the attached connection has taken everything it was sent (nothing queued in
    /// the server, nothing unsent or unacknowledged in the kernel). Two checks `ack_wait_ms`
    /// apart that both find everything delivered, with no ACK in between, mean the client reads
    /// but does not acknowledge (or acknowledges too lazily for the ring): the connection turns
    /// *unacknowledged* for the rest of its life, the ring keeps its newest `ring_bytes`, the
    /// agent gets CONTINUE, and from then on the connection's send backlog paces the agent
    /// ([`Session::on_send_backlog`]). Returns true when that switch happened.
    pub fn on_delivery(
        &mut self,
        delivered: bool,
        now: u64,
        cfg: &SessionConfig,
        sink: &mut impl Sink,
    ) -> bool {
        if self.ack_check == 0 || now < self.ack_check {
            return false;
        }
        let waiting = self.state == State::Attached
            && self.flags & (POD_PAUSED | UNACKED) == POD_PAUSED
            && cfg.overflow == Overflow::Drop;
        if !waiting {
            self.ack_check = 0;
            self.flags &= !DELIVERED;
            return false;
        }
        self.ack_check = now + cfg.ack_wait_ms.max(1);
        if !delivered {
            self.flags &= !DELIVERED;
            return false;
        }
        if self.flags & DELIVERED == 0 {
            self.flags |= DELIVERED;
            return false;
        }
        self.flags = (self.flags | UNACKED) & !(DELIVERED | POD_PAUSED);
        self.ack_check = 0;
        sink.flow(FlowEvent::Unacknowledged);
        let q = &mut self.conn_dropped;
        let d = self.ring.trim_noting(cfg.ring_bytes, |seq| {
            q.get_or_insert_with(Default::default).push_back(seq)
        });
        self.note_dropped(d, sink);
        sink.pod(self.id, PodMsg::Continue);
        true
    }

    /// The send backlog of an unacknowledged connection (§7.16) went over the runtime's high
    /// watermark (`backlogged`) or drained below its low one: PAUSE or CONTINUE the agent. No
    /// effect on acknowledging connections, whose ACKs pace the agent.
    pub fn on_send_backlog(&mut self, backlogged: bool, sink: &mut impl Sink) {
        if self.state != State::Attached || self.flags & UNACKED == 0 {
            return;
        }
        let paused = self.flags & POD_PAUSED != 0;
        if backlogged && !paused {
            self.flags |= POD_PAUSED;
            sink.pod(self.id, PodMsg::Pause);
        } else if !backlogged && paused {
            self.flags &= !POD_PAUSED;
            sink.pod(self.id, PodMsg::Continue);
        }
    }

    /// The pod PAUSEd (`true`) or CONTINUEd this session's input (POD-LINK.md §4). Returns
    /// whether that changed anything; the owner stops or restarts reading the client.
    pub fn on_pod_input(&mut self, paused: bool) -> bool {
        let was = self.flags & INPUT_PAUSED != 0;
        if paused {
            self.flags |= INPUT_PAUSED;
        } else {
            self.flags &= !INPUT_PAUSED;
        }
        was != paused
    }

    /// Forgets what belonged to the connection that is going away.
    fn forget_connection(&mut self) {
        self.flags &= !(ACK_PENDING | UNACKED | DELIVERED);
        self.conn_dropped = None;
        self.ack_check = 0;
    }

    /// The agent closed the session. Attached: DISCONNECT follows the output already written,
    /// then the connection closes. Suspended: the session waits for its client (or the TTL) so
    /// no output is lost.
    pub fn on_agent_close(&mut self, now: u64, sink: &mut impl Sink) -> Flow {
        match self.state {
            State::Attached => {
                self.flags |= AGENT_CLOSED;
                self.finish_with_agent_gone(now, sink);
                Flow::Close
            }
            State::Suspended => {
                self.flags |= AGENT_CLOSED;
                Flow::Continue
            }
            State::Closed => Flow::Close,
        }
    }

    /// The agent pod went away for good (POD-LINK.md §5). Attached: ERROR AGENT_GONE after the
    /// output already written, then DISCONNECT, then the connection closes. Suspended: the
    /// session waits for its client, who gets the replay, then AGENT_GONE and DISCONNECT.
    pub fn on_agent_gone(&mut self, now: u64, sink: &mut impl Sink) -> Flow {
        self.flags |= AGENT_GONE | AGENT_CLOSED;
        match self.state {
            State::Attached => {
                self.finish_with_agent_gone(now, sink);
                Flow::Close
            }
            State::Suspended => Flow::Continue,
            State::Closed => Flow::Close,
        }
    }

    fn finish_with_agent_gone(&mut self, now: u64, sink: &mut impl Sink) {
        if self.flags & AGENT_GONE != 0 {
            self.send_error(ErrorCode::AgentGone, now, sink);
        }
        self.send(FrameType::Disconnect, 0, now, sink, |_| {});
        self.state = State::Closed;
        self.ring = ReplayRing::new();
    }

    /// Ends the session from our side: the agent is told, the ring freed.
    pub fn close(&mut self, reason: CloseReason, sink: &mut impl Sink) {
        if self.state != State::Closed {
            if !self.agent_closed() {
                sink.pod(self.id, PodMsg::Close(reason));
            }
            self.state = State::Closed;
            self.ring = ReplayRing::new();
        }
    }

    /// The connection is gone (EOF, reset, error, idle timeout, broken framing, SUSPEND): the
    /// session is SUSPENDED and the agent told DETACHED.
    ///
    /// Under `--overflow drop` nothing blocks the agent while the client is away: a session
    /// paused while attached (its client stopped reading or acknowledging) gets CONTINUE right
    /// after DETACHED, and from then on its ring drops its oldest frames (POD-LINK.md §4).
    pub fn detach(&mut self, now: u64, cfg: &SessionConfig, sink: &mut impl Sink) {
        if self.state != State::Attached {
            return;
        }
        self.state = State::Suspended;
        self.last_rx = now;
        self.forget_connection();
        if !self.agent_closed() {
            sink.pod(self.id, PodMsg::Detached);
            if cfg.overflow == Overflow::Drop && self.flags & POD_PAUSED != 0 {
                self.flags &= !POD_PAUSED;
                sink.pod(self.id, PodMsg::Continue);
            }
        }
    }

    /// Another connection resumed this session: tell the current one (`old` is its sink) with
    /// ERROR TAKEN_OVER. The caller closes that connection, then calls [`Session::resume`].
    ///
    /// The session stays ATTACHED throughout (it only changes connection), so the agent is told
    /// nothing: neither DETACHED here nor ATTACHED by the resume that follows (PROTOCOL.md
    /// §7.10).
    pub fn take_over(&mut self, now: u64, old: &mut impl Sink) {
        if self.state == State::Attached {
            self.send_error(ErrorCode::TakenOver, now, old);
            self.forget_connection();
        }
    }

    /// Resumes the session on a new connection: RESUMED first, then the replay, then (if the
    /// agent has closed meanwhile) DISCONNECT. The caller has already checked the credential and
    /// handled any take-over. The agent is told ATTACHED only when the session was SUSPENDED
    /// (after a take-over it never stopped being attached).
    pub fn resume(
        &mut self,
        from: ResumeFrom,
        now: u64,
        cfg: &SessionConfig,
        sink: &mut impl Sink,
    ) -> Flow {
        if self.state == State::Closed {
            return Flow::Close;
        }
        let was_suspended = self.state == State::Suspended;
        let last_seq = match from {
            ResumeFrom::LastSeq(s) => {
                // The client holds everything up to last_seq: that acknowledges it, frames
                // still in the ring and frames overflow dropped alike (a later legacy RESUME
                // must not report those as a GAP). 0 included: after the counter wrapped it is
                // a frame like any other (the ring's frames up to it left above); in a session
                // that has not wrapped every SEQ sent is newer, so nothing changes.
                while let Some(f) = self.ring.front_seq() {
                    if !seq::le(f, s) {
                        break;
                    }
                    self.ring.pop_front();
                    self.note_acked(f);
                }
                if seq::gt(self.next_seq, s) {
                    self.note_acked(s);
                } else if self.ring.is_empty() {
                    // The client holds a SEQ this session has not issued: a session restored
                    // from a journal that missed control frames (KEEPALIVE, ACK) sent just
                    // before a crash. Numbering goes on after it, so no new frame reuses a SEQ
                    // the client already has.
                    self.next_seq = s.wrapping_add(1);
                    self.note_acked(s);
                }
                Some(s)
            }
            ResumeFrom::Unacknowledged => {
                (self.flags & HAS_ACKED != 0).then_some(self.acked_through)
            }
        };
        // GAP: a frame the client asked for (newer than what it holds) and never acknowledged
        // was dropped.
        let gap = self.flags & HAS_DROPPED != 0
            && match last_seq {
                Some(s) => seq::gt(self.dropped_through, s),
                None => true,
            }
            && (self.flags & HAS_ACKED == 0 || seq::gt(self.dropped_through, self.acked_through));
        let first_replay_seq = self.ring.front_seq().unwrap_or(0);
        self.state = State::Attached;
        self.last_rx = now;
        self.forget_connection();
        let resumed = Resumed {
            session_id: self.id,
            last_client_seq: self.last_client_seq,
            first_replay_seq,
        };
        let flags = if gap { proto::FLAG_GAP } else { 0 };
        self.send(FrameType::Resumed, flags, now, sink, |o| resumed.encode(o));
        for rec in self.ring.iter() {
            encode_with(
                sink.client(),
                self.id,
                rec.seq,
                FrameType::Data,
                proto::FLAG_REPLAY,
                |o| rec.for_each_piece(|p| o.extend_from_slice(p)),
            );
            sink.frame_written(None);
        }
        if gap {
            // Reported once: the client now knows where its history starts.
            self.flags &= !HAS_DROPPED;
        }
        if self.agent_closed() {
            self.finish_with_agent_gone(now, sink);
            return Flow::Close;
        }
        if was_suspended {
            sink.pod(self.id, PodMsg::Attached);
        }
        if cfg.overflow == Overflow::Drop
            && !self.pod_paused()
            && self.ring.payload_bytes() >= cfg.ring_bytes
        {
            self.flags |= POD_PAUSED;
            sink.pod(self.id, PodMsg::Pause);
        }
        // Paused on an earlier connection (a take-over, or an unacknowledged connection's
        // backlog): this one's ACKs, or its delivery checks, lift the pause.
        self.maybe_continue(cfg, sink);
        self.arm_delivery_check(now, cfg);
        Flow::Continue
    }

    /// The next time [`Session::on_timer`] has something to do.
    pub fn next_deadline(&self, cfg: &SessionConfig) -> Option<u64> {
        match self.state {
            State::Attached => {
                let d = (self.last_tx + cfg.keepalive_ms).min(self.last_rx + cfg.idle_ms);
                Some(match self.delivery_check() {
                    Some(c) => d.min(c),
                    None => d,
                })
            }
            State::Suspended => Some(self.last_rx + cfg.ttl_ms),
            State::Closed => None,
        }
    }

    /// Timers: keepalive and idle timeout while attached, suspend TTL while suspended.
    pub fn on_timer(&mut self, now: u64, cfg: &SessionConfig, sink: &mut impl Sink) -> Flow {
        match self.state {
            State::Attached => {
                if now >= self.last_rx + cfg.idle_ms {
                    self.detach(now, cfg, sink);
                    return Flow::Suspend;
                }
                if now >= self.last_tx + cfg.keepalive_ms {
                    self.send(FrameType::Keepalive, 0, now, sink, |_| {});
                }
                Flow::Continue
            }
            State::Suspended => {
                if now >= self.last_rx + cfg.ttl_ms {
                    self.close(CloseReason::SuspendExpired, sink);
                    return Flow::Close;
                }
                Flow::Continue
            }
            State::Closed => Flow::Close,
        }
    }
}
