//! The sans-IO client protocol core: handshake, RELIABLE resend, replay de-duplication,
//! coalesced cumulative ACKs and keepalives. No sockets and no clock: the caller feeds received
//! bytes and the current time (milliseconds on any monotonic scale) and writes out what
//! [`ClientCore::take_output`] returns.
//!
//! One `ClientCore` lives for the whole session, across any number of connections: call
//! [`ClientCore::start_connect`] (first connection) or [`ClientCore::start_resume`] (every later
//! one) each time a new transport connection is up, and [`ClientCore::connection_lost`] when it
//! goes away.

use std::collections::VecDeque;

use clawterm_core::proto::frame::encode_with;
use clawterm_core::proto::{
    self, decode, encode_to_vec, seq, Accept, Ack, Connect, Decoded, ErrorCode, ErrorFrame,
    FrameType, Resize, Resume, Resumed, Roam, CAP_RELIABLE, CAP_ROAM, CAP_V1, FLAG_GAP,
    FLAG_REPLAY,
};

/// Largest DATA payload the client sends (the server's minimum `--max-payload` is 1024).
pub const MAX_SEND_CHUNK: usize = 1024;

/// What the core reports to its driver.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CoreEvent {
    /// ACCEPT received: a new session.
    Accepted { session_id: u32 },
    /// RESUMED received: the session is attached again. `gap`: output was lost (ring overflow).
    Resumed { gap: bool, resent: usize },
    /// New output from the agent (never a byte shown before).
    Data(Vec<u8>),
    /// Output was dropped from the server's replay ring while we were away.
    Gap,
    /// The server ended the session (DISCONNECT).
    Ended,
    /// The server sent an ERROR. The connection is over; whether the session is, depends on the
    /// code.
    Error { code: u16, message: String },
    /// The session moved to another node: reconnect there and resume.
    Roam(std::net::SocketAddr),
}

/// The connection's broken: a protocol error on the byte stream the server sent.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CoreError {
    #[error("broken frame from server: {0}")]
    Decode(#[from] proto::DecodeError),
    #[error("unexpected {0} from server in state {1}")]
    Unexpected(&'static str, &'static str),
    #[error("malformed {0} from server: {1}")]
    Payload(&'static str, proto::PayloadError),
}

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum Phase {
    /// No connection.
    Down,
    /// CONNECT sent, waiting for ACCEPT.
    Connecting,
    /// RESUME sent, waiting for RESUMED.
    Resuming,
    Attached,
    /// The session ended (DISCONNECT) or was refused for good.
    Closed,
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Phase::Down => "down",
            Phase::Connecting => "connecting",
            Phase::Resuming => "resuming",
            Phase::Attached => "attached",
            Phase::Closed => "closed",
        }
    }
}

/// Timer settings.
#[derive(Copy, Clone, Debug)]
pub struct Timers {
    /// Send a KEEPALIVE when nothing was sent for this long (ms).
    pub keepalive_ms: u64,
    /// Consider the connection dead when nothing was received for this long (ms). Should exceed
    /// the server's `--keepalive` (default 30 s).
    pub dead_after_ms: u64,
}

impl Default for Timers {
    fn default() -> Self {
        Timers {
            keepalive_ms: 15_000,
            dead_after_ms: 75_000,
        }
    }
}

/// When the core acknowledges the server's DATA.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub enum AckPolicy {
    /// One coalesced cumulative ACK for the newest DATA at the end of every
    /// [`ClientCore::on_bytes`] call that delivered new DATA (the default; what the blocking
    /// session uses).
    #[default]
    PerRead,
    /// Only when the driver calls [`ClientCore::ack_now`]: a delayed ACK, or one that rides in
    /// the same write as the driver's next DATA ([`ClientCore::ack_pending`] says whether one is
    /// owed). The load generator uses this.
    Manual,
}

/// Behaviour knobs; [`CoreOptions::default`] is what the blocking session uses.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct CoreOptions {
    /// When received DATA is acknowledged.
    pub acks: AckPolicy,
    /// Offer RELIABLE in CONNECT (default `true`). Without it the server neither keeps the
    /// client's DATA for resend nor acknowledges it (one frame less per message).
    pub offer_reliable: bool,
    /// Report new output as [`CoreEvent::Data`] (default `true`). A driver that reads DATA
    /// through [`ClientCore::on_bytes_observed`] may turn this off to save a copy per frame.
    pub data_events: bool,
    /// Offer ROAM (capability `0x04`, default `true`): the client follows a session that moves
    /// to another node of a cluster ([`CoreEvent::Roam`]); the driver reconnects there and
    /// resumes. Without it the session stays reachable where the client connects.
    pub offer_roam: bool,
}

impl Default for CoreOptions {
    fn default() -> Self {
        CoreOptions {
            acks: AckPolicy::PerRead,
            offer_reliable: true,
            data_events: true,
            offer_roam: true,
        }
    }
}

/// A frame from the server as [`ClientCore::on_bytes_observed`] reports it, after the core
/// handled it (only frames the core accepted; a protocol error ends the call first).
#[derive(Copy, Clone, Debug)]
pub struct Seen<'a> {
    pub ty: FrameType,
    pub seq: u32,
    pub flags: u8,
    pub payload: &'a [u8],
    /// DATA only: newer than everything delivered before in the session (what
    /// [`CoreEvent::Data`] reports); `false` for a replay the client already holds.
    pub fresh: bool,
}

/// The session-long client protocol state.
pub struct ClientCore {
    tenant: u32,
    agent: u32,
    token: [u8; 32],
    phase: Phase,
    session_id: u32,
    resume_token: [u8; 16],
    /// SEQ for the next frame we send.
    next_seq: u32,
    /// Highest server DATA SEQ delivered (None: none yet).
    highest_data: Option<u32>,
    /// Highest SEQ we have acknowledged to the server.
    acked: Option<u32>,
    /// Client DATA not yet acknowledged by the server (RELIABLE), oldest first.
    unacked: VecDeque<(u32, Vec<u8>)>,
    unacked_bytes: usize,
    /// Whether the server does RELIABLE (known after ACCEPT/RESUMED; assumed until then).
    reliable: bool,
    rbuf: Vec<u8>,
    out: Vec<u8>,
    events: VecDeque<CoreEvent>,
    timers: Timers,
    last_tx: u64,
    last_rx: u64,
    pending_resize: Option<(u16, u16)>,
    opts: CoreOptions,
    /// The last RESUMED received.
    resumed: Option<Resumed>,
}

impl std::fmt::Debug for ClientCore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientCore")
            .field("phase", &self.phase)
            .field("session_id", &self.session_id)
            .field("next_seq", &self.next_seq)
            .field("highest_data", &self.highest_data)
            .field("unacked", &self.unacked.len())
            .finish_non_exhaustive()
    }
}

impl ClientCore {
    /// A core for a new session (send CONNECT with [`ClientCore::start_connect`]).
    pub fn new(tenant: u32, agent: u32, token: [u8; 32]) -> ClientCore {
        ClientCore {
            tenant,
            agent,
            token,
            phase: Phase::Down,
            session_id: 0,
            resume_token: [0; 16],
            next_seq: 1,
            highest_data: None,
            acked: None,
            unacked: VecDeque::new(),
            unacked_bytes: 0,
            reliable: true,
            rbuf: Vec::new(),
            out: Vec::new(),
            events: VecDeque::new(),
            timers: Timers::default(),
            last_tx: 0,
            last_rx: 0,
            pending_resize: None,
            opts: CoreOptions::default(),
            resumed: None,
        }
    }

    /// A core for an existing session (send RESUME with [`ClientCore::start_resume`]).
    /// `last_seq`: highest server DATA SEQ already received (0: none); `next_seq`: the SEQ to
    /// continue from (any value is accepted by the server).
    pub fn for_resume(
        tenant: u32,
        agent: u32,
        session_id: u32,
        resume_token: [u8; 16],
        last_seq: u32,
        next_seq: u32,
    ) -> ClientCore {
        let mut c = ClientCore::new(tenant, agent, [0; 32]);
        c.session_id = session_id;
        c.resume_token = resume_token;
        c.highest_data = (last_seq != 0).then_some(last_seq);
        c.acked = c.highest_data;
        c.next_seq = next_seq.max(1);
        c
    }

    pub fn set_timers(&mut self, t: Timers) {
        self.timers = t;
    }

    pub fn set_options(&mut self, o: CoreOptions) {
        self.opts = o;
        if !o.offer_reliable {
            self.reliable = false;
        }
    }

    pub fn options(&self) -> CoreOptions {
        self.opts
    }

    /// The last RESUMED the server sent (its `first_replay_seq` says where the replay starts).
    pub fn last_resumed(&self) -> Option<Resumed> {
        self.resumed
    }

    pub fn session_id(&self) -> u32 {
        self.session_id
    }

    pub fn resume_token(&self) -> [u8; 16] {
        self.resume_token
    }

    pub fn tenant(&self) -> u32 {
        self.tenant
    }

    pub fn agent(&self) -> u32 {
        self.agent
    }

    /// Highest server DATA SEQ received (0 if none): the RESUME `last_seq`.
    pub fn last_seq(&self) -> u32 {
        self.highest_data.unwrap_or(0)
    }

    /// The SEQ the next frame will take.
    pub fn next_seq(&self) -> u32 {
        self.next_seq
    }

    /// Client DATA frames kept for resend.
    pub fn unacked_frames(&self) -> usize {
        self.unacked.len()
    }

    pub fn unacked_bytes(&self) -> usize {
        self.unacked_bytes
    }

    pub fn is_attached(&self) -> bool {
        self.phase == Phase::Attached
    }

    pub fn is_closed(&self) -> bool {
        self.phase == Phase::Closed
    }

    /// Whether a handshake is under way.
    pub fn is_handshaking(&self) -> bool {
        matches!(self.phase, Phase::Connecting | Phase::Resuming)
    }

    /// Whether the session exists on the server (ACCEPT was received at some point).
    pub fn has_session(&self) -> bool {
        self.session_id != 0
    }

    fn take_seq(&mut self) -> u32 {
        let s = self.next_seq;
        self.next_seq = self.next_seq.wrapping_add(1);
        if self.next_seq == 0 {
            self.next_seq = 1;
        }
        s
    }

    fn emit(&mut self, ty: FrameType, payload: &[u8], now: u64) {
        let s = self.take_seq();
        encode_to_vec(&mut self.out, self.session_id, s, ty, 0, payload);
        self.last_tx = now;
    }

    /// A new connection is up: queue CONNECT.
    pub fn start_connect(&mut self, nonce: [u8; 16], now: u64) {
        self.rbuf.clear();
        self.out.clear();
        let c = Connect {
            version: proto::VERSION,
            caps: CAP_V1
                | if self.opts.offer_reliable {
                    CAP_RELIABLE
                } else {
                    0
                }
                | if self.opts.offer_roam { CAP_ROAM } else { 0 },
            caps_width: proto::payload::CapsWidth::U8,
            tenant_id: self.tenant,
            agent_id: self.agent,
            token: self.token,
            nonce,
        };
        let mut p = Vec::with_capacity(58);
        c.encode(&mut p);
        self.session_id = 0;
        self.emit(FrameType::Connect, &p, now);
        self.phase = Phase::Connecting;
        self.last_rx = now;
    }

    /// A new connection is up: queue RESUME (24-byte form).
    pub fn start_resume(&mut self, now: u64) {
        self.rbuf.clear();
        self.out.clear();
        let mut p = Vec::with_capacity(24);
        Resume::Full {
            session_id: self.session_id,
            last_seq: self.last_seq(),
            token: self.resume_token,
        }
        .encode(&mut p);
        self.emit(FrameType::Resume, &p, now);
        self.phase = Phase::Resuming;
        self.last_rx = now;
    }

    /// The connection went away (EOF, error, dead timer). Unsent output is dropped; client DATA
    /// stays queued for resend.
    pub fn connection_lost(&mut self) {
        self.rbuf.clear();
        self.out.clear();
        if self.phase != Phase::Closed {
            self.phase = Phase::Down;
        }
    }

    /// Queues DATA (split into chunks). Sent now if attached, otherwise after the next
    /// ACCEPT/RESUMED. Kept until the server acknowledges it.
    pub fn send_data(&mut self, mut bytes: &[u8], now: u64) {
        if self.phase == Phase::Closed {
            return;
        }
        while !bytes.is_empty() {
            let n = bytes.len().min(MAX_SEND_CHUNK);
            let s = self.take_seq();
            let chunk = &bytes[..n];
            bytes = &bytes[n..];
            if self.phase == Phase::Attached {
                encode_to_vec(&mut self.out, self.session_id, s, FrameType::Data, 0, chunk);
                self.last_tx = now;
                if !self.reliable {
                    continue;
                }
            }
            self.unacked_bytes += chunk.len();
            self.unacked.push_back((s, chunk.to_vec()));
        }
    }

    /// Queues RESIZE (remembered and sent on attach if down).
    pub fn resize(&mut self, cols: u16, rows: u16, now: u64) {
        if self.phase == Phase::Attached {
            let mut p = Vec::with_capacity(4);
            Resize { cols, rows }.encode(&mut p);
            self.emit(FrameType::Resize, &p, now);
        } else {
            self.pending_resize = Some((cols, rows));
        }
    }

    /// Queues SUSPEND (detach on purpose: the session stays on the server).
    pub fn suspend(&mut self, now: u64) {
        if self.phase == Phase::Attached {
            self.emit(FrameType::Suspend, &[], now);
        }
    }

    /// Queues DISCONNECT (ends the session on the server).
    pub fn disconnect(&mut self, now: u64) {
        if self.phase == Phase::Attached {
            self.emit(FrameType::Disconnect, &[], now);
        }
        self.phase = Phase::Closed;
    }

    /// Bytes to write to the connection (drains the buffer).
    pub fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.out)
    }

    /// Appends the bytes to write to `dst` and drains the buffer, keeping both allocations (for
    /// a driver that writes many small frames).
    pub fn take_output_into(&mut self, dst: &mut Vec<u8>) {
        if dst.is_empty() {
            // No copy: the buffers trade places (`dst`'s allocation is the core's next one).
            std::mem::swap(dst, &mut self.out);
        } else {
            dst.extend_from_slice(&self.out);
            self.out.clear();
        }
    }

    /// Runs `f` with `buf` as the output buffer: what is queued already, then what `f` queues,
    /// is appended to `buf`, and the core's own buffer is not touched. A driver of many
    /// connections lends every core the same (cache-hot) buffer this way.
    pub fn output_into<R>(&mut self, buf: &mut Vec<u8>, f: impl FnOnce(&mut ClientCore) -> R) -> R {
        if !self.out.is_empty() {
            buf.extend_from_slice(&self.out);
            self.out.clear();
        }
        std::mem::swap(buf, &mut self.out);
        let r = f(self);
        std::mem::swap(buf, &mut self.out);
        r
    }

    /// Whether received DATA is not acknowledged yet (attached only).
    pub fn ack_pending(&self) -> bool {
        self.phase == Phase::Attached
            && self
                .highest_data
                .is_some_and(|h| self.acked.is_none_or(|a| seq::gt(h, a)))
    }

    /// Queues the cumulative ACK for the newest DATA now, if one is owed (attached only). With
    /// [`AckPolicy::Manual`] this is the only way ACKs are sent; queued just before
    /// [`ClientCore::send_data`], it goes out in the same write.
    pub fn ack_now(&mut self, now: u64) {
        if self.phase == Phase::Attached {
            self.flush_ack(now);
        }
    }

    /// Whether output is waiting.
    pub fn has_output(&self) -> bool {
        !self.out.is_empty()
    }

    /// The next event, if any.
    pub fn poll_event(&mut self) -> Option<CoreEvent> {
        self.events.pop_front()
    }

    /// Timers: queues a KEEPALIVE when idle. Returns `false` when the connection should be
    /// considered dead (nothing received for `dead_after_ms`, or handshake not answered).
    pub fn tick(&mut self, now: u64) -> bool {
        match self.phase {
            Phase::Attached => {
                if now.saturating_sub(self.last_tx) >= self.timers.keepalive_ms {
                    self.emit(FrameType::Keepalive, &[], now);
                }
                now.saturating_sub(self.last_rx) < self.timers.dead_after_ms
            }
            Phase::Connecting | Phase::Resuming => {
                now.saturating_sub(self.last_rx) < self.timers.dead_after_ms.min(15_000)
            }
            _ => true,
        }
    }

    /// When [`ClientCore::tick`] next has something to do (ms, same scale as `now`).
    pub fn next_timer(&self) -> Option<u64> {
        match self.phase {
            Phase::Attached => Some(
                (self.last_tx + self.timers.keepalive_ms)
                    .min(self.last_rx + self.timers.dead_after_ms),
            ),
            Phase::Connecting | Phase::Resuming => {
                Some(self.last_rx + self.timers.dead_after_ms.min(15_000))
            }
            _ => None,
        }
    }

    /// Feeds bytes received on the connection. Events go to [`ClientCore::poll_event`]; a
    /// coalesced cumulative ACK for new DATA is queued once per call (with the default
    /// [`AckPolicy::PerRead`]).
    pub fn on_bytes(&mut self, bytes: &[u8], now: u64) -> Result<(), CoreError> {
        self.on_bytes_observed(bytes, now, |_| {})
    }

    /// [`ClientCore::on_bytes`], and `observe` sees every frame the core handled, in order,
    /// right after it was handled (for a driver that measures: SEQ, FLAGS, payload and whether
    /// a DATA frame was new). The observer decides nothing: the core's state and output are
    /// the same as with `on_bytes`.
    pub fn on_bytes_observed(
        &mut self,
        bytes: &[u8],
        now: u64,
        mut observe: impl FnMut(&Seen<'_>),
    ) -> Result<(), CoreError> {
        self.last_rx = now;
        let res = if self.rbuf.is_empty() {
            // Nothing held back from the last call: decode in place, keep only the rest.
            let (off, res) = self.frames(bytes, now, &mut observe);
            self.rbuf.extend_from_slice(&bytes[off..]);
            res
        } else {
            self.rbuf.extend_from_slice(bytes);
            let buf = std::mem::take(&mut self.rbuf);
            let (off, res) = self.frames(&buf, now, &mut observe);
            self.rbuf = buf;
            self.rbuf.drain(..off);
            res
        };
        if res.is_ok() && self.phase == Phase::Attached && self.opts.acks == AckPolicy::PerRead {
            self.flush_ack(now);
        }
        res
    }

    /// Handles the whole frames at the start of `buf`; returns how many bytes they took (the
    /// rest is kept for the next call) and whether the stream is still good.
    fn frames(
        &mut self,
        buf: &[u8],
        now: u64,
        observe: &mut impl FnMut(&Seen<'_>),
    ) -> (usize, Result<(), CoreError>) {
        let mut off = 0;
        let res = loop {
            match decode(&buf[off..], proto::MAX_PAYLOAD) {
                Ok(Decoded::NeedMore(_)) => break Ok(()),
                Ok(Decoded::Frame(f, used)) => {
                    off += used;
                    match self.on_frame(f.seq, f.ty, f.flags, f.payload, now) {
                        Ok(fresh) => observe(&Seen {
                            ty: f.ty,
                            seq: f.seq,
                            flags: f.flags,
                            payload: f.payload,
                            fresh,
                        }),
                        Err(e) => break Err(e),
                    }
                    if self.phase == Phase::Closed || self.phase == Phase::Down {
                        break Ok(());
                    }
                }
                Err(e) => break Err(CoreError::Decode(e)),
            }
        };
        (off, res)
    }

    fn flush_ack(&mut self, now: u64) {
        if let Some(h) = self.highest_data {
            if self.acked.is_none_or(|a| seq::gt(h, a)) {
                let s = self.take_seq();
                encode_with(&mut self.out, self.session_id, s, FrameType::Ack, 0, |p| {
                    Ack::Cumulative(h).encode(p)
                });
                self.last_tx = now;
                self.acked = Some(h);
            }
        }
    }

    fn attach(&mut self, now: u64, last_client_seq: Option<u32>) -> usize {
        self.phase = Phase::Attached;
        if let Some(l) = last_client_seq {
            // Everything up to last_client_seq reached the server.
            self.drop_acked(l);
            if self.unacked.is_empty() && !seq::gt(self.next_seq, l) {
                self.next_seq = l.wrapping_add(1).max(1);
            }
        }
        if let Some((cols, rows)) = self.pending_resize.take() {
            self.resize(cols, rows, now);
        }
        let mut resent = 0;
        for (s, chunk) in &self.unacked {
            encode_to_vec(
                &mut self.out,
                self.session_id,
                *s,
                FrameType::Data,
                0,
                chunk,
            );
            resent += 1;
        }
        if resent > 0 {
            self.last_tx = now;
        }
        if !self.reliable {
            self.unacked.clear();
            self.unacked_bytes = 0;
        }
        resent
    }

    fn drop_acked(&mut self, through: u32) {
        while let Some((s, _)) = self.unacked.front() {
            if seq::le(*s, through) {
                let (_, c) = self.unacked.pop_front().unwrap();
                self.unacked_bytes -= c.len();
            } else {
                break;
            }
        }
    }

    fn on_frame(
        &mut self,
        fseq: u32,
        ty: FrameType,
        flags: u8,
        payload: &[u8],
        now: u64,
    ) -> Result<bool, CoreError> {
        match (self.phase, ty) {
            (_, FrameType::Error) => {
                let e = ErrorFrame::parse(payload).map_err(|e| CoreError::Payload("ERROR", e))?;
                let fatal = matches!(
                    e.known(),
                    Some(
                        ErrorCode::AuthFailed
                            | ErrorCode::NoSuchSession
                            | ErrorCode::TakenOver
                            | ErrorCode::UnsupportedVersion
                            | ErrorCode::BadConnect
                    )
                ) || (self.phase == Phase::Connecting
                    && e.known() == Some(ErrorCode::NoAgent));
                if e.known() == Some(ErrorCode::AgentGone) {
                    // DISCONNECT follows: the session is over.
                    self.phase = Phase::Closed;
                    self.events.push_back(CoreEvent::Ended);
                    return Ok(false);
                }
                self.phase = if fatal { Phase::Closed } else { Phase::Down };
                self.events.push_back(CoreEvent::Error {
                    code: e.code,
                    message: e.message,
                });
                Ok(false)
            }
            (Phase::Connecting, FrameType::Accept) => {
                let a = Accept::parse(payload).map_err(|e| CoreError::Payload("ACCEPT", e))?;
                self.session_id = a.session_id;
                self.resume_token = a.resume_token.unwrap_or([0; 16]);
                // RELIABLE when both ends do it (ACCEPT carries the server's capabilities).
                self.reliable = self.opts.offer_reliable && a.caps & CAP_RELIABLE != 0;
                self.events.push_back(CoreEvent::Accepted {
                    session_id: a.session_id,
                });
                // Nothing reached the server yet: send everything queued.
                self.attach(now, None);
                Ok(false)
            }
            (Phase::Resuming, FrameType::Resumed) => {
                let r = Resumed::parse(payload).map_err(|e| CoreError::Payload("RESUMED", e))?;
                self.resumed = Some(r);
                let resent = self.attach(now, Some(r.last_client_seq));
                let gap = flags & FLAG_GAP != 0;
                self.events.push_back(CoreEvent::Resumed { gap, resent });
                if gap {
                    self.events.push_back(CoreEvent::Gap);
                }
                Ok(false)
            }
            (Phase::Attached, FrameType::Data) => {
                let _replay = flags & FLAG_REPLAY != 0;
                let new = self.highest_data.is_none_or(|h| seq::gt(fseq, h));
                if new {
                    self.highest_data = Some(fseq);
                    if !payload.is_empty() && self.opts.data_events {
                        self.events.push_back(CoreEvent::Data(payload.to_vec()));
                    }
                }
                Ok(new)
            }
            (Phase::Attached, FrameType::Ack) => {
                if let Ok(Ack::Cumulative(s)) = Ack::parse(payload) {
                    self.drop_acked(s);
                }
                Ok(false)
            }
            (Phase::Attached, FrameType::Disconnect) => {
                self.phase = Phase::Closed;
                self.events.push_back(CoreEvent::Ended);
                Ok(false)
            }
            // ROAM on a live session, or as the answer to a RESUME that reached a node that
            // does not hold the session (PROTOCOL.md §2.6).
            (Phase::Attached | Phase::Resuming, FrameType::Roam) => {
                let r = Roam::parse(payload).map_err(|e| CoreError::Payload("ROAM", e))?;
                self.resume_token = r.roam_token;
                self.phase = Phase::Down;
                self.events
                    .push_back(CoreEvent::Roam(std::net::SocketAddr::new(r.addr, r.port)));
                Ok(false)
            }
            // Never answer a KEEPALIVE; NACK and unknown types are ignored.
            (Phase::Attached, FrameType::Keepalive | FrameType::Nack | FrameType::Unknown(_)) => {
                Ok(false)
            }
            (p, t) => Err(CoreError::Unexpected(t.name(), p.name())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(sid: u32, s: u32, ty: FrameType, flags: u8, p: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        encode_to_vec(&mut v, sid, s, ty, flags, p);
        v
    }

    fn frames(bytes: &[u8]) -> Vec<(u32, FrameType, Vec<u8>)> {
        let mut out = Vec::new();
        let mut off = 0;
        while let Ok(Decoded::Frame(f, n)) = decode(&bytes[off..], proto::MAX_PAYLOAD) {
            out.push((f.seq, f.ty, f.payload.to_vec()));
            off += n;
        }
        out
    }

    fn accepted() -> ClientCore {
        let mut c = ClientCore::new(7, 1, [0xAB; 32]);
        c.start_connect([0; 16], 0);
        let out = frames(&c.take_output());
        assert_eq!(out[0].1, FrameType::Connect);
        assert_eq!(out[0].2.len(), 58);
        let mut p = Vec::new();
        Accept {
            session_id: 5,
            version: 1,
            caps: CAP_RELIABLE,
            resume_token: Some([3; 16]),
        }
        .encode(&mut p);
        c.on_bytes(&frame(5, 1, FrameType::Accept, 0, &p), 0)
            .unwrap();
        assert!(c.is_attached());
        c
    }

    #[test]
    fn replay_is_deduplicated_and_acked_once() {
        let mut c = accepted();
        let mut b = frame(5, 2, FrameType::Data, 0, b"a");
        b.extend(frame(5, 3, FrameType::Data, 0, b"b"));
        b.extend(frame(5, 4, FrameType::Keepalive, 0, b""));
        c.on_bytes(&b, 1).unwrap();
        let out = frames(&c.take_output());
        // One coalesced ACK, no KEEPALIVE answer.
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].1, FrameType::Ack);
        assert_eq!(out[0].2, 3u32.to_be_bytes());
        c.connection_lost();
        c.start_resume(2);
        let out = frames(&c.take_output());
        assert_eq!(out[0].1, FrameType::Resume);
        assert_eq!(&out[0].2[4..8], &3u32.to_be_bytes());
        let mut p = Vec::new();
        Resumed {
            session_id: 5,
            last_client_seq: 0,
            first_replay_seq: 3,
        }
        .encode(&mut p);
        let mut b = frame(5, 6, FrameType::Resumed, 0, &p);
        b.extend(frame(5, 3, FrameType::Data, FLAG_REPLAY, b"b"));
        b.extend(frame(5, 5, FrameType::Data, FLAG_REPLAY, b"c"));
        c.on_bytes(&b, 3).unwrap();
        let evs: Vec<_> = std::iter::from_fn(|| c.poll_event()).collect();
        assert!(evs.contains(&CoreEvent::Data(b"a".to_vec())));
        let data: Vec<_> = evs
            .iter()
            .filter_map(|e| match e {
                CoreEvent::Data(d) => Some(d.clone()),
                _ => None,
            })
            .collect();
        assert_eq!(data, vec![b"a".to_vec(), b"b".to_vec(), b"c".to_vec()]);
        assert_eq!(c.last_seq(), 5);
    }

    #[test]
    fn unacked_input_is_resent_after_resume() {
        let mut c = accepted();
        c.send_data(b"x", 1); // seq 2
        c.send_data(b"y", 1); // seq 3
        c.take_output();
        let mut p = Vec::new();
        Ack::Cumulative(2).encode(&mut p);
        c.on_bytes(&frame(5, 2, FrameType::Ack, 0, &p), 2).unwrap();
        assert_eq!(c.unacked_frames(), 1);
        c.connection_lost();
        c.send_data(b"z", 3); // seq 4, queued
        c.start_resume(4); // seq 5
        c.take_output();
        let mut p = Vec::new();
        Resumed {
            session_id: 5,
            last_client_seq: 2,
            first_replay_seq: 0,
        }
        .encode(&mut p);
        c.on_bytes(&frame(5, 9, FrameType::Resumed, FLAG_GAP, &p), 5)
            .unwrap();
        let out = frames(&c.take_output());
        let data: Vec<_> = out
            .iter()
            .filter(|f| f.1 == FrameType::Data)
            .map(|f| (f.0, f.2.clone()))
            .collect();
        assert_eq!(data, vec![(3, b"y".to_vec()), (4, b"z".to_vec())]);
        assert!(std::iter::from_fn(|| c.poll_event()).any(|e| e == CoreEvent::Gap));
        // Client SEQs continue.
        assert_eq!(c.next_seq(), 6);
    }

    #[test]
    fn manual_acks_wait_for_ack_now_and_ride_with_the_next_data() {
        let mut c = ClientCore::new(7, 1, [0xAB; 32]);
        c.set_options(CoreOptions {
            acks: AckPolicy::Manual,
            offer_reliable: false,
            data_events: false,
            offer_roam: false,
        });
        c.start_connect([0; 16], 0);
        let out = frames(&c.take_output());
        let caps = Connect::parse(&out[0].2).unwrap().caps;
        assert_eq!(caps, CAP_V1, "RELIABLE not offered");
        let mut p = Vec::new();
        Accept {
            session_id: 5,
            version: 1,
            caps: CAP_RELIABLE, // the server's capabilities, not what was agreed
            resume_token: Some([3; 16]),
        }
        .encode(&mut p);
        c.on_bytes(&frame(5, 1, FrameType::Accept, 0, &p), 0)
            .unwrap();
        assert!(!c.ack_pending());
        let mut b = frame(5, 2, FrameType::Data, 0, b"a");
        b.extend(frame(5, 3, FrameType::Data, 0, b"b"));
        b.extend(frame(5, 2, FrameType::Data, FLAG_REPLAY, b"a"));
        let mut seen = Vec::new();
        c.on_bytes_observed(&b, 1, |f| seen.push((f.ty, f.seq, f.fresh)))
            .unwrap();
        assert_eq!(
            seen,
            vec![
                (FrameType::Data, 2, true),
                (FrameType::Data, 3, true),
                (FrameType::Data, 2, false)
            ]
        );
        // No ACK and no Data events until asked.
        assert!(!c.has_output());
        assert_eq!(c.poll_event(), Some(CoreEvent::Accepted { session_id: 5 }));
        assert_eq!(c.poll_event(), None);
        assert!(c.ack_pending());
        let mut out = Vec::new();
        let tag = c.output_into(&mut out, |c| {
            c.ack_now(2);
            let tag = c.next_seq();
            c.send_data(b"x", 2);
            tag
        });
        assert!(!c.has_output());
        let out = frames(&out);
        assert_eq!(out.len(), 2);
        assert_eq!(
            (out[0].1, &out[0].2[..]),
            (FrameType::Ack, &3u32.to_be_bytes()[..])
        );
        assert_eq!((out[1].0, out[1].1), (tag, FrameType::Data));
        assert!(!c.ack_pending());
        // Not RELIABLE: nothing kept for resend.
        assert_eq!(c.unacked_frames(), 0);
        c.ack_now(3);
        assert!(!c.has_output(), "an ACK is sent once");
    }

    #[test]
    fn default_options_ack_every_read() {
        assert_eq!(CoreOptions::default().acks, AckPolicy::PerRead);
        let mut c = accepted();
        c.on_bytes(&frame(5, 2, FrameType::Data, 0, b"a"), 1)
            .unwrap();
        assert!(!c.ack_pending());
        assert_eq!(frames(&c.take_output())[0].1, FrameType::Ack);
        assert_eq!(c.poll_event(), Some(CoreEvent::Accepted { session_id: 5 }));
        assert_eq!(c.poll_event(), Some(CoreEvent::Data(b"a".to_vec())));
    }

    #[test]
    fn keepalive_when_idle_and_dead_detection() {
        let mut c = accepted();
        c.take_output();
        assert!(c.tick(1_000));
        assert!(!c.has_output());
        assert!(c.tick(15_000));
        assert_eq!(frames(&c.take_output())[0].1, FrameType::Keepalive);
        assert!(!c.tick(80_000));
    }
}
