//! Fuzzes the sans-IO server session core (`session::Session`) under an arbitrary sequence of
//! events decoded from the input, driven the way the shard handler drives it: client frames of
//! any type, SEQ, SESSION_ID, FLAGS and payload (valid and invalid) in batches followed by the
//! coalesced ACK, agent output (small pieces, pieces over the maximum payload, floods past the
//! ring's hard cap), agent CLOSE and pod loss, timers at arbitrary later times (and exactly at
//! the session's deadline), broken streams, lost connections, RESUME with an arbitrary
//! `last_seq` or in the legacy form, take-over by a second connection, and server shutdown.
//! The settings (`--max-payload`, `--ring-bytes`, timers, overflow policy), the client's
//! capabilities and the first server SEQ (so the counter wraps) come from the input too.
//!
//! After every call the target checks:
//! * no panic; every byte written for the client decodes (with the session's maximum payload)
//!   into whole frames carrying the session's id, and every frame except replayed DATA takes
//!   the next server SEQ;
//! * the replay ring never holds more than its hard cap (a suspended session with the drop
//!   policy: its `--ring-bytes`), holds no memory when empty, only loses frames to overflow
//!   when they did not fit, and frames leave it only when acknowledged (cumulative ACK, the
//!   k-th empty ACK for the k-th DATA frame of the connection, RESUME's `last_seq`);
//! * RESUME: RESUMED first (right session id, last client SEQ, first replay SEQ), then exactly
//!   the ring's frames in SEQ order with REPLAY set and the bytes the agent produced, all newer
//!   than `last_seq`; GAP exactly when a frame dropped since GAP was last reported is one the
//!   client asked for and never acknowledged (acknowledged: by empty ACKs, which count dropped
//!   frames too, cumulative ACKs and RESUME's `last_seq`); the old connection of a take-over
//!   gets ERROR TAKEN_OVER and the agent is told nothing;
//! * KEEPALIVE is never answered (nothing at all is written for a client KEEPALIVE) and is sent
//!   only by the timer once the session's deadline has come; a timer before `next_deadline`
//!   does nothing;
//! * refused frames get the contract's ERROR, suspend the session and are not counted; client
//!   DATA and RESIZE reach the agent unchanged; RELIABLE clients get one cumulative ACK per
//!   batch, others none;
//! * pod messages keep their order rules (PAUSE/CONTINUE and DETACHED/ATTACHED alternate, one
//!   CLOSE at most, nothing after the agent closed);
//! * once the session is closed nothing more is written to the client or the agent.
#![no_main]

use clawterm::podlink::{CloseReason, Msg as PodMsg};
use clawterm::proto::{
    decode, encode_to_vec, seq, Accept, Ack, Decoded, ErrorCode, ErrorFrame, FrameType, Resize,
    Resumed, CAP_RELIABLE, CAP_ROAM, CAP_V1, FLAG_GAP, FLAG_REPLAY, VERSION,
};
use clawterm::session::{Flow, Overflow, ResumeFrom, Session, SessionConfig, Sink, State};
use libfuzzer_sys::fuzz_target;
use std::collections::{HashMap, HashSet};

/// `FUZZ_TRACE=1` prints every call and what it did (to read a finding).
fn tracing() -> bool {
    static T: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *T.get_or_init(|| std::env::var_os("FUZZ_TRACE").is_some())
}

macro_rules! trace {
    ($($a:tt)*) => {
        if tracing() {
            eprintln!($($a)*);
        }
    };
}

const ID: u32 = 0x5EED_0101;
const TOKEN: [u8; 16] = [0x5A; 16];
/// Agent output per input, at most (floods included): enough to overflow the hard cap once
/// (`--ring-bytes` + 4 MiB at most here), and no more: every byte costs two CRCs.
const OUTPUT_BUDGET: usize = 6 << 20;
/// Client bytes per input after which the script stops (a big ring replayed on every RESUME
/// costs two CRCs per byte too).
const EMIT_BUDGET: usize = 16 << 20;
/// One flood message: the pod link's largest DATA body.
const FLOOD_MSG: usize = 1 << 20;

/// Reads the fuzz input; zeros once it is used up.
struct In<'a>(&'a [u8]);

impl In<'_> {
    fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }
    fn u16(&mut self) -> u16 {
        u16::from_be_bytes([self.u8(), self.u8()])
    }
    fn u32(&mut self) -> u32 {
        u32::from_be_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let n = n.min(self.0.len());
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        a.to_vec()
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Pod {
    Open,
    Data(Vec<u8>),
    Resize(u16, u16),
    Detached,
    Attached,
    Close(CloseReason),
    Pause,
    Continue,
}

#[derive(Default)]
struct Rec {
    client: Vec<u8>,
    pod: Vec<Pod>,
    /// What the session reported writing (`Sink::frame_written`): frames, ERROR codes.
    written: (usize, Vec<u16>),
}

impl Sink for Rec {
    fn client(&mut self) -> &mut Vec<u8> {
        &mut self.client
    }
    fn frame_written(&mut self, error: Option<ErrorCode>) {
        self.written.0 += 1;
        if let Some(code) = error {
            self.written.1.push(code as u16);
        }
    }
    fn pod(&mut self, id: u32, msg: PodMsg<'_>) {
        assert_eq!(id, ID);
        self.pod.push(match msg {
            PodMsg::Open(_) => Pod::Open,
            PodMsg::Data(d) => Pod::Data(d.to_vec()),
            PodMsg::Resize { cols, rows } => Pod::Resize(cols, rows),
            PodMsg::Detached => Pod::Detached,
            PodMsg::Attached => Pod::Attached,
            PodMsg::Close(r) => Pod::Close(r),
            PodMsg::Pause => Pod::Pause,
            PodMsg::Continue => Pod::Continue,
            m => panic!("session sent {m:?} to the pod"),
        });
    }
}

/// A decoded frame the session wrote.
#[derive(Debug, Clone)]
struct Out {
    seq: u32,
    ty: FrameType,
    flags: u8,
    payload: Vec<u8>,
}

/// What kind of call is being checked (what it may legitimately do).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum Kind {
    Timer,
    Resume,
    AgentData,
    ClientFrame,
    /// A delivery check (PROTOCOL.md §7.16): may trim the ring when the connection turns
    /// unacknowledged.
    Delivery,
    Other,
}

/// What a call did, for the event-specific checks.
struct Done {
    frames: Vec<Out>,
    pods: Vec<Pod>,
    /// SEQs that left the ring in this call.
    removed: Vec<u32>,
    /// DATA SEQs issued in this call.
    issued: Vec<u32>,
    /// The call's own SEQ numbering started here.
    next_before: u32,
    state_before: State,
}

struct H {
    cfg: SessionConfig,
    s: Session,
    now: u64,
    reliable: bool,
    /// Every DATA frame the session numbered, with its bytes.
    log: HashMap<u32, Vec<u8>>,
    /// The first SEQ the session used (ACCEPT's).
    first_seq: u32,
    /// The ring's SEQs after the last call.
    ring: Vec<u32>,
    /// Acknowledged per the contract: exact SEQs (empty ACKs), and cumulative bounds.
    acked_exact: HashSet<u32>,
    acked_through: Vec<u32>,
    /// An ACK or RESUME named a SEQ the server never sent: the empty-ACK, GAP and "newer than"
    /// checks, which are defined by serial arithmetic over what was sent, are not made (or only
    /// in a weaker form) past that point.
    wild: bool,
    /// Frames dropped from the ring since GAP was last reported and not acknowledged since,
    /// and how many were dropped since then at all (acknowledged or not: the contract's
    /// acknowledgements are not the session's once a SEQ was wild).
    dropped: Vec<u32>,
    dropped_since_gap: usize,
    /// DATA frames sent on the current connection (live and replayed), in order.
    conn_sent: Vec<u32>,
    last_client_seq: u32,
    ack_pending: bool,
    pod_paused: bool,
    /// The connection turned unacknowledged (§7.16): backlog-paced, the ring keeps the newest
    /// `ring_bytes`.
    unacked: bool,
    /// The last delivery check found everything delivered, no ACK since.
    delivered_seen: bool,
    pod_detached: bool,
    pod_closed: bool,
    agent_closed: bool,
    agent_gone: bool,
    output_left: usize,
    emitted: usize,
}

fn frames(bytes: &[u8], max: usize) -> Vec<Out> {
    let mut v = Vec::new();
    let mut rest = bytes;
    while !rest.is_empty() {
        match decode(rest, max) {
            Ok(Decoded::Frame(f, used)) => {
                assert_eq!(f.session_id, ID, "frame for another session");
                v.push(Out {
                    seq: f.seq,
                    ty: f.ty,
                    flags: f.flags,
                    payload: f.payload.to_vec(),
                });
                rest = &rest[used..];
            }
            other => panic!("session wrote a broken or partial frame: {other:?}"),
        }
    }
    v
}

fn ring_summary(r: &[u32]) -> String {
    match r {
        [] => "[]".into(),
        [a] => format!("[{a}]"),
        [a, .., b] => format!("[{a}..{b}: {} frames]", r.len()),
    }
}

fn error_code(f: &Out) -> ErrorCode {
    assert_eq!(f.ty, FrameType::Error);
    let e = ErrorFrame::parse(&f.payload).expect("ERROR payload");
    let code = e.known().expect("known code");
    assert_eq!(e.message, code.message());
    code
}

impl H {
    fn ring_now(&self) -> Vec<u32> {
        self.s.ring().iter().map(|r| r.seq).collect()
    }

    fn is_acked(&self, s: u32) -> bool {
        self.acked_exact.contains(&s) || self.acked_through.iter().any(|&t| seq::le(s, t))
    }

    /// A SEQ the session has sent (or the one before the first): what a real client can name.
    fn plausible(&self, s: u32) -> bool {
        let from = self.first_seq.wrapping_sub(1);
        s.wrapping_sub(from) <= self.s.next_seq().wrapping_sub(from).wrapping_sub(1)
    }

    fn begin(&self) -> (u32, State, Rec) {
        (self.s.next_seq(), self.s.state(), Rec::default())
    }

    /// The checks every call gets.
    fn end(&mut self, kind: Kind, before: (u32, State, Rec)) -> Done {
        let (next_before, state_before, rec) = before;
        let frames = frames(&rec.client, self.cfg.max_payload);
        // What the session says it wrote is what it wrote (the server counts its metrics so).
        assert_eq!(rec.written.0, frames.len(), "frames reported written");
        let errors: Vec<u16> = frames
            .iter()
            .filter(|f| f.ty == FrameType::Error)
            .map(|f| u16::from_be_bytes([f.payload[0], f.payload[1]]))
            .collect();
        assert_eq!(rec.written.1, errors, "ERROR codes reported written");
        self.emitted += rec.client.len();
        let pods = rec.pod;
        trace!(
            "  {kind:?} {state_before:?} -> {:?}, next SEQ {next_before} -> {}, ring {} -> {}",
            self.s.state(),
            self.s.next_seq(),
            ring_summary(&self.ring),
            ring_summary(&self.ring_now())
        );
        for f in frames.iter().take(8) {
            let n = f.payload.len();
            trace!(
                "    client <- {:?} seq {} flags {} len {n}",
                f.ty,
                f.seq,
                f.flags
            );
        }
        if frames.len() > 8 {
            trace!("    client <- ... {} frames in all", frames.len());
        }
        trace!("    pod <- {pods:?}");
        if state_before == State::Closed {
            assert!(frames.is_empty() && pods.is_empty(), "emitted after Close");
            assert_eq!(self.s.state(), State::Closed);
        }
        if state_before != State::Attached && kind != Kind::Resume {
            assert!(
                frames.is_empty(),
                "client bytes with no connection: {frames:?}"
            );
        }
        // SEQ numbering: everything but replayed DATA takes the next SEQ.
        let mut n = next_before;
        let mut issued = Vec::new();
        for f in &frames {
            if f.flags & FLAG_REPLAY != 0 {
                assert_eq!((kind, f.ty), (Kind::Resume, FrameType::Data));
                continue;
            }
            assert_eq!(f.seq, n, "{:?} out of SEQ order", f.ty);
            n = n.wrapping_add(1);
            if f.ty == FrameType::Keepalive {
                assert_eq!(kind, Kind::Timer, "KEEPALIVE outside the timer");
            }
        }
        if kind == Kind::AgentData {
            // DATA numbered while suspended is not written: all of the call's SEQs are DATA.
            let mut s = next_before;
            while s != self.s.next_seq() {
                issued.push(s);
                s = s.wrapping_add(1);
            }
        } else {
            assert_eq!(self.s.next_seq(), n, "SEQs taken without a frame");
        }
        // The ring: bounded, no memory when empty, FIFO.
        let ring = self.s.ring();
        assert!(ring.payload_bytes() <= self.cfg.hard_ring_bytes());
        if ring.is_empty() {
            assert_eq!(ring.heap_bytes(), 0);
            assert_eq!(ring.payload_bytes(), 0);
        }
        let after = self.ring_now();
        let k = after
            .first()
            .and_then(|f| self.ring.iter().position(|s| s == f))
            .unwrap_or(self.ring.len());
        let kept = self.ring.len() - k;
        assert!(
            after.len() >= kept && after[..kept] == self.ring[k..],
            "ring not FIFO"
        );
        let appended = &after[kept..];
        let j = issued.len() - appended.len().min(issued.len());
        assert_eq!(
            appended,
            &issued[j..],
            "ring holds frames it never numbered"
        );
        let mut removed = self.ring[..k].to_vec();
        removed.extend_from_slice(&issued[..j]);
        self.ring = after;
        // Pod messages.
        for p in &pods {
            assert!(!self.agent_closed, "{p:?} to an agent that closed");
            assert!(!self.pod_closed, "{p:?} after CLOSE");
            match p {
                Pod::Open => panic!("OPEN after accept"),
                Pod::Pause => {
                    assert!(!self.pod_paused, "PAUSE twice");
                    self.pod_paused = true;
                }
                Pod::Continue => {
                    assert!(self.pod_paused, "CONTINUE without PAUSE");
                    self.pod_paused = false;
                }
                Pod::Detached => {
                    assert!(!self.pod_detached, "DETACHED twice");
                    self.pod_detached = true;
                }
                Pod::Attached => {
                    assert!(self.pod_detached, "ATTACHED while attached");
                    self.pod_detached = false;
                }
                Pod::Close(_) => self.pod_closed = true,
                Pod::Data(_) | Pod::Resize(..) => assert_eq!(kind, Kind::ClientFrame),
            }
        }
        if kind != Kind::ClientFrame {
            assert_eq!(self.s.last_client_seq(), self.last_client_seq);
        }
        if self.s.state() == State::Closed {
            self.ring.clear();
        } else if kind != Kind::ClientFrame
            && kind != Kind::Resume
            && kind != Kind::AgentData
            && kind != Kind::Delivery
        {
            assert!(
                removed.is_empty(),
                "{kind:?} removed {removed:?} from the ring"
            );
        }
        Done {
            frames,
            pods,
            removed,
            issued,
            next_before,
            state_before,
        }
    }

    /// Checks the ERROR + suspend that refuses a client frame.
    fn refused(&mut self, d: &Done, flow: Flow, code: ErrorCode) {
        assert_eq!(flow, Flow::Suspend);
        assert_eq!(d.frames.len(), 1, "{:?}", d.frames);
        assert_eq!(error_code(&d.frames[0]), code);
        assert_eq!(self.s.state(), State::Suspended);
        self.check_detach_pods(&d.pods);
        self.detached();
    }

    /// DETACHED, then under `--overflow drop` CONTINUE if the agent was paused (POD-LINK.md
    /// §4: nothing blocks the agent while the client is away); under `pause` it stays paused.
    /// (`end` has already applied the messages to `pod_paused`.)
    fn check_detach_pods(&self, pods: &[Pod]) {
        match pods {
            [Pod::Detached] => {
                assert!(
                    !(self.pod_paused && self.cfg.overflow == Overflow::Drop),
                    "suspended under drop and still paused"
                );
            }
            [Pod::Detached, Pod::Continue] => {
                assert_eq!(self.cfg.overflow, Overflow::Drop, "CONTINUE on detach under pause")
            }
            other => panic!("detach told the agent {other:?}"),
        }
    }

    fn detached(&mut self) {
        self.ack_pending = false;
        self.conn_sent.clear();
        self.unacked = false;
        self.delivered_seen = false;
    }

    /// Whether a delivery check must be pending: attached, paused by a full ring, still
    /// acknowledging, drop policy.
    fn check_pending_delivery(&self) {
        let want = self.s.state() == State::Attached
            && self.pod_paused
            && !self.unacked
            && self.cfg.overflow == Overflow::Drop;
        assert_eq!(
            self.s.delivery_check().is_some(),
            want,
            "delivery check {:?} (paused {}, unacked {})",
            self.s.delivery_check(),
            self.pod_paused,
            self.unacked
        );
    }

    fn client_frame(&mut self, i: &mut In) -> Flow {
        let sel = i.u8();
        let ty = match sel % 20 {
            0..=5 => FrameType::Data,
            6..=8 => FrameType::Ack,
            9 => FrameType::Resize,
            10 | 11 => FrameType::Keepalive,
            12 => FrameType::Nack,
            13 => FrameType::Suspend,
            14 => FrameType::Disconnect,
            15 => FrameType::Connect,
            16 => FrameType::Resume,
            17 => FrameType::from_code(i.u8()),
            18 => [FrameType::Accept, FrameType::Resumed, FrameType::Roam][i.u8() as usize % 3],
            _ => FrameType::Error,
        };
        let sid = match i.u8() % 16 {
            0 => i.u32(),
            1 => 0,
            _ => ID,
        };
        let fseq = match i.u8() % 4 {
            0 => i.u32(),
            _ => self.last_client_seq.wrapping_add(1 + i.u8() as u32 % 4),
        };
        let flags = if i.u8() % 8 == 0 { i.u8() } else { 0 };
        let mut p = Vec::new();
        match (ty, i.u8() % 8) {
            (_, 0) => {
                let n = i.u8() as usize;
                p = i.bytes(n);
            }
            (FrameType::Ack, 1..=3) => {}
            (FrameType::Ack, 4 | 5) => {
                // Something the client received on this connection, or near the newest SEQ.
                let t = if self.conn_sent.is_empty() {
                    self.s.next_seq().wrapping_sub(1 + i.u8() as u32 % 4)
                } else {
                    self.conn_sent[i.u8() as usize % self.conn_sent.len()]
                };
                Ack::Cumulative(t).encode(&mut p)
            }
            (FrameType::Ack, _) => Ack::Cumulative(match i.u8() % 4 {
                0 => i.u32(),
                _ => self.s.next_seq().wrapping_sub(i.u8() as u32),
            })
            .encode(&mut p),
            (FrameType::Resize, _) => Resize {
                cols: i.u16(),
                rows: i.u16(),
            }
            .encode(&mut p),
            (FrameType::Data, _) => {
                let n = i.u8() as usize % 32;
                p = i.bytes(n);
            }
            (FrameType::Accept, _) => Accept {
                session_id: ID,
                version: VERSION,
                caps: 0,
                resume_token: Some(TOKEN),
            }
            .encode(&mut p),
            _ => {}
        }
        let mut wire = Vec::new();
        encode_to_vec(&mut wire, sid, fseq, ty, flags, &p);
        let Ok(Decoded::Frame(f, used)) = decode(&wire, self.cfg.max_payload) else {
            panic!("client frame does not decode");
        };
        assert_eq!(used, wire.len());

        trace!("client frame {ty:?} sid {sid:#x} seq {fseq} flags {flags} payload {p:?}");
        let b = self.begin();
        let mut rec = b.2;
        let flow = self.s.on_client_frame(&f, self.now, &self.cfg, &mut rec);
        let d = self.end(Kind::ClientFrame, (b.0, b.1, rec));
        if d.state_before != State::Attached {
            assert_eq!(flow, Flow::Suspend);
            assert!(d.frames.is_empty() && d.pods.is_empty());
            return flow;
        }
        let violation = ErrorCode::ProtocolViolation;
        let is_ack = ty == FrameType::Ack && Ack::parse(&p).is_ok();
        if sid != ID || !is_ack {
            // Only an ACK takes frames out of the ring (DISCONNECT frees it with the session).
            assert!(d.removed.is_empty() || self.s.state() == State::Closed);
        }
        if sid != ID {
            // Refused whatever the type, and not counted.
            self.refused(&d, flow, violation);
            assert_eq!(self.s.last_client_seq(), self.last_client_seq);
            return flow;
        }
        match ty {
            FrameType::Data => {
                assert_eq!(flow, Flow::Continue);
                assert!(d.frames.is_empty());
                assert_eq!(d.pods, [Pod::Data(p.clone())]);
                self.last_client_seq = fseq;
                assert_eq!(self.s.last_client_seq(), fseq);
                self.ack_pending |= self.reliable;
            }
            FrameType::Ack => match Ack::parse(&p) {
                Err(_) => self.refused(&d, flow, violation),
                Ok(ack) => {
                    assert_eq!(flow, Flow::Continue);
                    assert!(d.frames.is_empty());
                    self.acked(ack, &d);
                    self.delivered_seen = false;
                    let continued = self.s.ring().payload_bytes() < self.cfg.ring_bytes / 2;
                    match d.pods.as_slice() {
                        [] => {}
                        [Pod::Continue] => {
                            assert!(continued);
                            assert!(!self.unacked, "an ACK lifted a backlog pause");
                        }
                        other => panic!("ACK sent {other:?} to the pod"),
                    }
                    self.check_pending_delivery();
                }
            },
            FrameType::Resize => match Resize::parse(&p) {
                Err(_) => self.refused(&d, flow, violation),
                Ok(r) => {
                    assert_eq!(flow, Flow::Continue);
                    assert!(d.frames.is_empty());
                    assert_eq!(d.pods, [Pod::Resize(r.cols, r.rows)]);
                }
            },
            FrameType::Keepalive | FrameType::Nack | FrameType::Unknown(_) => {
                // Never answered, in particular not a KEEPALIVE with a KEEPALIVE.
                assert_eq!(flow, Flow::Continue);
                assert!(d.frames.is_empty() && d.pods.is_empty(), "{:?}", d.frames);
            }
            FrameType::Suspend => {
                assert_eq!(flow, Flow::Suspend);
                assert!(d.frames.is_empty());
                self.check_detach_pods(&d.pods);
                assert_eq!(self.s.state(), State::Suspended);
                self.detached();
            }
            FrameType::Disconnect => {
                assert_eq!(flow, Flow::Close);
                assert!(d.frames.is_empty());
                assert_eq!(d.pods, [Pod::Close(CloseReason::ClientDisconnect)]);
                assert_eq!(self.s.state(), State::Closed);
            }
            _ => self.refused(&d, flow, violation),
        }
        // Only DATA counts as received, never a refused frame.
        assert_eq!(self.s.last_client_seq(), self.last_client_seq);
        flow
    }

    /// Which frames an accepted ACK took out of the ring, against the contract (§2.5).
    fn acked(&mut self, ack: Ack, d: &Done) {
        match ack {
            Ack::Cumulative(t) => {
                if !self.plausible(t) {
                    self.wild = true;
                }
                for &s in &d.removed {
                    assert!(seq::le(s, t), "ACK {t} removed {s}");
                }
                if let Some(&front) = self.ring.first() {
                    if !self.wild {
                        assert!(seq::gt(front, t), "ACK {t} left {front} in the ring");
                    }
                }
                self.acked_through.push(t);
            }
            Ack::Empty => {
                // It acknowledges the oldest not-yet-acknowledged DATA frame sent on this
                // connection: with empty ACKs only, the k-th DATA frame for the k-th ACK; after
                // a cumulative ACK, the oldest frame of the connection newer than everything it
                // and the empty ACKs before acknowledged (dropped frames count, §2.5).
                assert!(d.removed.len() <= 1);
                let target = self.conn_sent.iter().copied().find(|&s| !self.is_acked(s));
                self.acked_exact.extend(d.removed.iter().copied());
                if let Some(s) = target {
                    self.acked_exact.insert(s);
                }
                if self.wild {
                    // A SEQ the server never sent acknowledges frames it sends later (serial
                    // arithmetic): only the general rules apply.
                    return;
                }
                match target {
                    Some(s) if d.removed.is_empty() => {
                        // Only if overflow already dropped it.
                        assert!(!self.ring.contains(&s), "empty ACK kept {s} in the ring");
                        assert!(self.log.contains_key(&s), "empty ACK for {s}, never sent");
                    }
                    Some(s) => assert_eq!(d.removed, [s], "empty ACK"),
                    None => assert!(d.removed.is_empty(), "ACK for a frame never sent"),
                }
            }
        }
    }

    fn end_batch(&mut self) {
        let b = self.begin();
        let mut rec = b.2;
        self.s.end_batch(self.now, &mut rec);
        let d = self.end(Kind::Other, (b.0, b.1, rec));
        assert!(d.pods.is_empty());
        if d.state_before == State::Attached && self.ack_pending {
            self.ack_pending = false;
            assert_eq!(d.frames.len(), 1);
            assert_eq!(d.frames[0].ty, FrameType::Ack);
            assert_eq!(
                Ack::parse(&d.frames[0].payload).unwrap(),
                Ack::Cumulative(self.last_client_seq)
            );
        } else {
            assert!(d.frames.is_empty(), "ACK with nothing to acknowledge");
        }
    }

    fn agent_data(&mut self, data: &[u8]) {
        let data = &data[..data.len().min(self.output_left)];
        self.output_left -= data.len();
        trace!("agent data, {} bytes", data.len());
        let payload_before = self.s.ring().payload_bytes();
        let b = self.begin();
        let mut rec = b.2;
        self.s.on_agent_data(data, self.now, &self.cfg, &mut rec);
        let d = self.end(Kind::AgentData, (b.0, b.1, rec));
        let attached = d.state_before == State::Attached;
        if d.state_before == State::Closed || self.agent_closed {
            assert!(d.issued.is_empty() && d.frames.is_empty() && d.pods.is_empty());
            return;
        }
        let pieces: Vec<&[u8]> = data.chunks(self.cfg.send_payload()).collect();
        assert!(self.cfg.send_payload() <= self.cfg.max_payload);
        assert_eq!(d.issued.len(), pieces.len(), "split wrongly");
        for (s, p) in d.issued.iter().zip(&pieces) {
            self.log.insert(*s, p.to_vec());
        }
        if attached {
            assert_eq!(d.frames.len(), pieces.len());
            for ((f, s), p) in d.frames.iter().zip(&d.issued).zip(&pieces) {
                assert_eq!((f.ty, f.seq, f.flags), (FrameType::Data, *s, 0));
                assert_eq!(&f.payload[..], *p);
            }
            self.conn_sent.extend_from_slice(&d.issued);
        }
        let lossless = if attached {
            !self.unacked
        } else {
            self.cfg.overflow == Overflow::Pause
        };
        let cap = if lossless {
            self.cfg.hard_ring_bytes()
        } else {
            self.cfg.ring_bytes
        };
        let held = self.s.ring().payload_bytes();
        if !lossless && !pieces.is_empty() {
            assert!(held <= self.cfg.ring_bytes);
        }
        if payload_before + data.len() <= cap {
            assert!(
                d.removed.is_empty(),
                "dropped {:?} though it fit",
                d.removed
            );
        }
        self.dropped_since_gap += d.removed.len();
        for &s in &d.removed {
            if !self.is_acked(s) {
                self.dropped.push(s);
            }
        }
        match d.pods.as_slice() {
            [] => assert!(!lossless || self.pod_paused || held < self.cfg.ring_bytes),
            [Pod::Pause] => {
                assert!(lossless && held >= self.cfg.ring_bytes);
                self.delivered_seen = false;
            }
            other => panic!("agent data sent {other:?} to the pod"),
        }
        if self.s.state() != State::Closed {
            self.check_pending_delivery();
        }
    }

    /// A delivery check at (or after) its deadline, or too early (PROTOCOL.md §7.16).
    fn delivery(&mut self, delivered: bool, early: bool) {
        let due = self.s.delivery_check();
        if let Some(t) = due {
            if !early {
                self.now = self.now.max(t);
            }
        }
        trace!("delivery check at {} (due {due:?}), delivered {delivered}", self.now);
        let waiting = self.s.state() == State::Attached
            && self.pod_paused
            && !self.unacked
            && self.cfg.overflow == Overflow::Drop;
        let acts = due.is_some_and(|t| self.now >= t) && waiting;
        let payload_before = self.s.ring().payload_bytes();
        let b = self.begin();
        let mut rec = b.2;
        let switched = self.s.on_delivery(delivered, self.now, &self.cfg, &mut rec);
        let d = self.end(Kind::Delivery, (b.0, b.1, rec));
        assert!(d.frames.is_empty() && d.issued.is_empty());
        let want = acts && delivered && self.delivered_seen;
        assert_eq!(switched, want, "switch (acts {acts}, delivered {delivered}, seen before {})", self.delivered_seen);
        if want {
            trace!("  connection turned unacknowledged; dropped {:?}", d.removed);
            assert_eq!(d.pods, [Pod::Continue]);
            self.unacked = true;
            self.delivered_seen = false;
            assert!(self.s.unacknowledged());
            assert!(self.s.ring().payload_bytes() <= self.cfg.ring_bytes);
            if payload_before <= self.cfg.ring_bytes {
                assert!(d.removed.is_empty(), "trimmed a ring within its cap");
            }
            self.dropped_since_gap += d.removed.len();
            for &r in &d.removed {
                if !self.is_acked(r) {
                    self.dropped.push(r);
                }
            }
        } else {
            assert!(d.pods.is_empty() && d.removed.is_empty());
            if acts {
                self.delivered_seen = delivered;
            } else if due.is_some_and(|t| self.now >= t) {
                self.delivered_seen = false; // a check no longer waited for is dropped
            }
        }
        if self.s.state() != State::Closed {
            self.check_pending_delivery();
        }
    }

    /// The send backlog of the connection went over its high watermark or below its low one.
    fn backlog(&mut self, backlogged: bool) {
        trace!("send backlog {backlogged}");
        let paused = self.pod_paused;
        let b = self.begin();
        let mut rec = b.2;
        self.s.on_send_backlog(backlogged, &mut rec);
        let d = self.end(Kind::Other, (b.0, b.1, rec));
        assert!(d.frames.is_empty());
        let applies = self.s.state() == State::Attached && self.unacked;
        match d.pods.as_slice() {
            [] => assert!(!applies || backlogged == paused),
            [Pod::Pause] => assert!(applies && backlogged && !paused),
            [Pod::Continue] => assert!(applies && !backlogged && paused),
            other => panic!("backlog sent {other:?} to the pod"),
        }
    }

    fn timer(&mut self, dt: Option<u64>) {
        let deadline = self.s.next_deadline(&self.cfg);
        match dt {
            Some(dt) => self.now += dt,
            None => self.now = self.now.max(deadline.unwrap_or(self.now)),
        }
        trace!("timer at {} (deadline {deadline:?})", self.now);
        let b = self.begin();
        let mut rec = b.2;
        let flow = self.s.on_timer(self.now, &self.cfg, &mut rec);
        let d = self.end(Kind::Timer, (b.0, b.1, rec));
        match (d.state_before, deadline) {
            (State::Closed, _) => assert_eq!(flow, Flow::Close),
            (_, Some(t)) if self.now < t => {
                assert_eq!(flow, Flow::Continue, "timer acted before its deadline");
                assert!(d.frames.is_empty() && d.pods.is_empty());
            }
            (State::Attached, Some(_)) => match flow {
                Flow::Suspend => {
                    assert!(d.frames.is_empty());
                    self.check_detach_pods(&d.pods);
                    assert_eq!(self.s.state(), State::Suspended);
                    self.detached();
                }
                Flow::Continue if d.frames.is_empty() => {
                    // Only the delivery check was due: the owner's call, not the timer's.
                    assert_eq!(self.s.delivery_check(), deadline, "deadline passed, nothing done");
                    assert!(d.pods.is_empty());
                }
                Flow::Continue => {
                    assert_eq!(d.frames.len(), 1);
                    assert_eq!(d.frames[0].ty, FrameType::Keepalive);
                    assert!(d.pods.is_empty());
                }
                Flow::Close => panic!("timer closed an attached session"),
            },
            (State::Suspended, Some(_)) => {
                assert_eq!(flow, Flow::Close);
                assert_eq!(self.s.state(), State::Closed);
                if self.agent_closed {
                    assert!(d.pods.is_empty());
                } else {
                    assert_eq!(d.pods, [Pod::Close(CloseReason::SuspendExpired)]);
                }
            }
            other => panic!("no deadline in {other:?}"),
        }
    }

    fn resume(&mut self, from: ResumeFrom) -> Flow {
        if let ResumeFrom::LastSeq(s) = from {
            if !self.plausible(s) {
                self.wild = true;
            }
        }
        trace!("resume {from:?}");
        // A connection is attached: the new one takes the session over.
        let b = self.begin();
        let mut old = b.2;
        self.s.take_over(self.now, &mut old);
        let d = self.end(Kind::Other, (b.0, b.1, old));
        assert!(d.pods.is_empty(), "take-over told the agent {:?}", d.pods);
        if d.state_before == State::Attached {
            assert_eq!(d.frames.len(), 1);
            assert_eq!(error_code(&d.frames[0]), ErrorCode::TakenOver);
            assert_eq!(self.s.state(), State::Attached);
            self.detached();
        } else {
            assert!(d.frames.is_empty());
        }

        let was_suspended = self.s.state() == State::Suspended;
        let b = self.begin();
        let mut rec = b.2;
        let flow = self.s.resume(from, self.now, &self.cfg, &mut rec);
        let d = self.end(Kind::Resume, (b.0, b.1, rec));
        if d.state_before == State::Closed {
            assert_eq!(flow, Flow::Close);
            return flow;
        }
        // Frames leave the ring only as far as RESUME acknowledges them.
        if let ResumeFrom::LastSeq(s) = from {
            for &r in &d.removed {
                if self.s.state() != State::Closed {
                    assert!(seq::le(r, s), "RESUME {s} removed {r}");
                }
            }
            self.acked_through.push(s);
        } else if self.s.state() != State::Closed {
            assert!(d.removed.is_empty());
        }
        // RESUMED, then the replay.
        let f = d.frames.first().expect("no RESUMED");
        assert_eq!((f.ty, f.seq), (FrameType::Resumed, d.next_before));
        let r = Resumed::parse(&f.payload).expect("RESUMED payload");
        let gap = f.flags & FLAG_GAP != 0;
        assert_eq!(f.flags & !FLAG_GAP, 0);
        let n = d.frames[1..]
            .iter()
            .take_while(|f| f.flags & FLAG_REPLAY != 0)
            .count();
        let replayed: Vec<&Out> = d.frames[1..1 + n].iter().collect();
        let replay: Vec<u32> = replayed.iter().map(|f| f.seq).collect();
        assert_eq!(r.session_id, ID);
        assert_eq!(r.last_client_seq, self.last_client_seq);
        assert_eq!(r.first_replay_seq, replay.first().copied().unwrap_or(0));
        for (k, f) in replayed.iter().enumerate() {
            assert_eq!(f.ty, FrameType::Data);
            assert_eq!(f.flags, FLAG_REPLAY);
            assert_eq!(
                self.log.get(&f.seq),
                Some(&f.payload),
                "replayed other bytes"
            );
            if k > 0 {
                assert!(
                    seq::gt(f.seq, replay[k - 1]),
                    "replay out of order: {replay:?}"
                );
            }
            if let (ResumeFrom::LastSeq(s), false) = (from, self.wild) {
                assert!(seq::gt(f.seq, s), "replayed {} with last_seq {s}", f.seq);
            }
        }
        if self.s.state() != State::Closed {
            assert_eq!(replay, self.ring, "replay is not the ring");
        }
        // GAP exactly when a frame dropped since GAP was last reported is one the client asked
        // for and never acknowledged (§2.4). `dropped` holds the dropped frames that were
        // unacknowledged when they were dropped; acknowledgements since (empty ACKs counting
        // dropped frames, cumulative ACKs, an earlier or this RESUME's `last_seq`, which the
        // model counts as acknowledging everything up to it) take frames out of "asked for".
        // Once a SEQ was wild, the contract's acknowledgements are not the session's: GAP is
        // then checked only as "something was dropped since it was last reported".
        let lost_unacked = self.dropped.iter().any(|&s| !self.is_acked(s));
        if !self.wild {
            assert!(
                !lost_unacked || gap,
                "dropped {:?} unacknowledged, no GAP",
                self.dropped
            );
            assert!(
                lost_unacked || !gap,
                "GAP though all {} frames dropped since the last GAP were acknowledged",
                self.dropped_since_gap
            );
        }
        if gap {
            assert!(self.dropped_since_gap > 0, "GAP with nothing dropped");
            self.dropped.clear();
            self.dropped_since_gap = 0;
        } else {
            let acked: Vec<bool> = self.dropped.iter().map(|&s| self.is_acked(s)).collect();
            let mut it = acked.into_iter();
            self.dropped.retain(|_| !it.next().unwrap());
        }
        // Then, if the agent closed meanwhile, its end.
        let rest: Vec<&Out> = d.frames[1 + n..].iter().collect();
        if self.agent_closed {
            assert_eq!(flow, Flow::Close);
            assert_eq!(self.s.state(), State::Closed);
            let mut want = Vec::new();
            if self.agent_gone {
                want.push(FrameType::Error);
                assert_eq!(error_code(rest[0]), ErrorCode::AgentGone);
            }
            want.push(FrameType::Disconnect);
            assert_eq!(rest.iter().map(|f| f.ty).collect::<Vec<_>>(), want);
            assert!(d.pods.is_empty());
        } else {
            assert_eq!(flow, Flow::Continue);
            assert!(rest.is_empty(), "after the replay: {rest:?}");
            assert_eq!(self.s.state(), State::Attached);
            let mut pods = d.pods.as_slice();
            if was_suspended {
                assert_eq!(pods.first(), Some(&Pod::Attached));
                pods = &pods[1..];
            }
            match pods {
                [] => {}
                [Pod::Pause] => assert!(self.s.ring().payload_bytes() >= self.cfg.ring_bytes),
                // Paused on an earlier connection (a backlog pause, or a take-over) with a ring
                // already below half.
                [Pod::Continue] => {
                    assert!(self.s.ring().payload_bytes() < self.cfg.ring_bytes / 2)
                }
                other => panic!("resume sent {other:?} to the pod"),
            }
            assert!(!self.s.unacknowledged(), "a new connection starts acknowledging");
            self.unacked = false;
            self.delivered_seen = false;
            self.check_pending_delivery();
        }
        self.conn_sent = replay;
        flow
    }
}

fuzz_target!(|data: &[u8]| {
    let mut i = In(data);
    // Half the inputs near the smallest maximum, so that output is split cheaply.
    let mp = i.u16() as usize;
    let max_payload = if mp & 0x8000 == 0 {
        1024 + mp % 1024
    } else {
        1024 + mp % (65535 - 1024 + 1)
    };
    let ring_bytes = max_payload * (1 + i.u8() as usize % 4) + i.u16() as usize;
    let send_payload = match i.u8() % 4 {
        0 => max_payload,
        _ => 512 + i.u16() as usize % 2048,
    };
    let cfg = SessionConfig {
        ring_bytes,
        max_payload,
        send_payload,
        ack_wait_ms: 1 + i.u8() as u64 * 4,
        keepalive_ms: 1 + i.u16() as u64 % 2_000,
        idle_ms: 1 + i.u16() as u64 % 6_000,
        ttl_ms: 1 + i.u16() as u64 % 20_000,
        overflow: if i.u8() & 1 == 0 {
            Overflow::Drop
        } else {
            Overflow::Pause
        },
    };
    let caps_byte = i.u8();
    let caps = caps_byte & (CAP_V1 | CAP_RELIABLE);
    // Floods cost two CRCs per byte (the session's encoder, the check's decoder): they are
    // allowed only by a header bit pattern, so most inputs run fast.
    let floods = caps_byte & 0xF0 == 0xF0;
    let first_seq = match i.u8() % 4 {
        0 => u32::MAX - (i.u8() as u32 % 8),
        1 => i.u32(),
        _ => 1,
    };
    trace!("{cfg:?}, caps {caps:#x}, first SEQ {first_seq}");
    let mut s = Session::new(ID, 7, 42, caps, TOKEN, 0).with_next_seq(first_seq);
    let mut rec = Rec::default();
    s.accept(CAP_RELIABLE | CAP_ROAM, "198.51.100.7:40000", 0, &mut rec);
    let out = frames(&rec.client, max_payload);
    assert_eq!(out.len(), 1);
    assert_eq!((out[0].ty, out[0].seq), (FrameType::Accept, first_seq));
    let a = Accept::parse(&out[0].payload).unwrap();
    assert_eq!((a.session_id, a.resume_token), (ID, Some(TOKEN)));
    assert_eq!(rec.pod, [Pod::Open]);

    let mut h = H {
        cfg,
        s,
        now: 0,
        reliable: caps & CAP_RELIABLE != 0,
        log: HashMap::new(),
        first_seq,
        ring: Vec::new(),
        acked_exact: HashSet::new(),
        acked_through: Vec::new(),
        wild: false,
        dropped: Vec::new(),
        dropped_since_gap: 0,
        conn_sent: Vec::new(),
        last_client_seq: 0,
        ack_pending: false,
        pod_paused: false,
        unacked: false,
        delivered_seen: false,
        pod_detached: false,
        pod_closed: false,
        agent_closed: false,
        agent_gone: false,
        output_left: OUTPUT_BUDGET,
        emitted: 0,
    };

    let mut steps = 0;
    while !i.0.is_empty() && steps < 400 && h.emitted < EMIT_BUDGET {
        steps += 1;
        let op = i.u8() % 16;
        if ![0, 1, 2, 3, 4, 5, 6, 7, 9, 10].contains(&op) {
            trace!("op {op}");
        }
        match op {
            // A batch of client frames, then the coalesced ACK (the server stops reading the
            // batch at the first frame that ends the connection).
            0..=4 => {
                let n = 1 + i.u8() % 6;
                let mut alive = true;
                for _ in 0..n {
                    if h.client_frame(&mut i) != Flow::Continue {
                        alive = false;
                        break;
                    }
                }
                if alive {
                    h.end_batch();
                }
            }
            // A flood: the agent ignores PAUSE. Pod-link DATA messages of up to 1 MiB, cut
            // from a fixed pseudo-random block so that no two frames carry the same bytes.
            8 if floods && i.u8() % 4 == 0 => {
                static BLOCK: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
                let block = BLOCK.get_or_init(|| {
                    (0..2 * FLOOD_MSG as u32)
                        .map(|k| (k.wrapping_mul(2_654_435_761) >> 13) as u8)
                        .collect()
                });
                let msgs = 1 + i.u8() as usize % 6;
                for _ in 0..msgs {
                    if h.output_left == 0 {
                        break;
                    }
                    let at = i.u16() as usize * 7;
                    h.agent_data(&block[at..at + FLOOD_MSG]);
                }
            }
            5..=8 => {
                let len = match i.u8() {
                    b @ 0..=219 => b as usize,
                    b @ 220..=251 => (b as usize - 219) * 97,
                    // Over the maximum payload: split.
                    _ => h.cfg.max_payload * (1 + i.u8() as usize % 2) + i.u8() as usize,
                };
                let fill = i.u8();
                let data: Vec<u8> = (0..len).map(|k| fill ^ (k as u8)).collect();
                h.agent_data(&data);
            }
            9 => {
                let dt = match i.u8() {
                    0..=15 => None,
                    b @ 16..=239 => Some(b as u64 * 37),
                    b => Some((b as u64 - 239) * 10_000),
                };
                h.timer(dt);
            }
            10 => {
                let from = match i.u8() % 8 {
                    0 => ResumeFrom::Unacknowledged,
                    1 => ResumeFrom::LastSeq(i.u32()),
                    2 | 3 if !h.conn_sent.is_empty() => {
                        let k = i.u8() as usize % h.conn_sent.len();
                        ResumeFrom::LastSeq(h.conn_sent[k])
                    }
                    _ => ResumeFrom::LastSeq(h.s.next_seq().wrapping_sub(1 + i.u8() as u32)),
                };
                h.resume(from);
            }
            11 => {
                // The connection is gone (EOF, reset, idle, broken framing without an answer).
                let b = h.begin();
                let mut rec = b.2;
                h.s.detach(h.now, &h.cfg, &mut rec);
                let d = h.end(Kind::Other, (b.0, b.1, rec));
                assert!(d.frames.is_empty());
                if d.state_before == State::Attached {
                    h.check_detach_pods(&d.pods);
                    assert_eq!(h.s.state(), State::Suspended);
                    h.detached();
                } else {
                    assert!(d.pods.is_empty());
                }
            }
            12 => {
                // A broken stream: the server answers with the decoder's code.
                let code = [ErrorCode::BadFrame, ErrorCode::TooLarge][i.u8() as usize % 2];
                let b = h.begin();
                let mut rec = b.2;
                let flow = h.s.fail(code, h.now, &h.cfg, &mut rec);
                let d = h.end(Kind::Other, (b.0, b.1, rec));
                if d.state_before == State::Attached {
                    h.refused(&d, flow, code);
                } else {
                    assert_eq!(flow, Flow::Suspend);
                    assert!(d.frames.is_empty() && d.pods.is_empty());
                }
            }
            13 => {
                let gone = i.u8() & 1 == 1;
                let b = h.begin();
                let mut rec = b.2;
                let flow = if gone {
                    h.s.on_agent_gone(h.now, &mut rec)
                } else {
                    h.s.on_agent_close(h.now, &mut rec)
                };
                let d = h.end(Kind::Other, (b.0, b.1, rec));
                assert!(d.pods.is_empty());
                match d.state_before {
                    State::Attached => {
                        assert_eq!(flow, Flow::Close);
                        assert_eq!(h.s.state(), State::Closed);
                        let tys: Vec<FrameType> = d.frames.iter().map(|f| f.ty).collect();
                        if gone || h.agent_gone {
                            assert_eq!(tys, [FrameType::Error, FrameType::Disconnect]);
                            assert_eq!(error_code(&d.frames[0]), ErrorCode::AgentGone);
                        } else {
                            assert_eq!(tys, [FrameType::Disconnect]);
                        }
                    }
                    State::Suspended => {
                        assert_eq!(flow, Flow::Continue);
                        assert!(d.frames.is_empty());
                        assert_eq!(h.s.state(), State::Suspended);
                    }
                    State::Closed => assert_eq!(flow, Flow::Close),
                }
                if d.state_before != State::Closed {
                    h.agent_closed = true;
                    h.agent_gone |= gone;
                }
            }
            14 => {
                // Shutdown.
                let b = h.begin();
                let mut rec = b.2;
                h.s.close(CloseReason::Normal, &mut rec);
                let d = h.end(Kind::Other, (b.0, b.1, rec));
                assert!(d.frames.is_empty());
                assert_eq!(h.s.state(), State::Closed);
                if d.state_before != State::Closed && !h.agent_closed {
                    assert_eq!(d.pods, [Pod::Close(CloseReason::Normal)]);
                } else {
                    assert!(d.pods.is_empty());
                }
            }
            _ => match i.u8() % 8 {
                // Flow control from the connection's side (§7.16).
                0..=2 => {
                    let b = i.u8();
                    h.delivery(b & 1 == 1, b & 2 == 2 && b & 4 == 4);
                    if b & 8 == 8 {
                        // The next check too: two in a row is what switches a connection.
                        h.delivery(b & 16 == 0, false);
                    }
                }
                3 => {
                    let b = i.u8() & 1 == 1;
                    h.backlog(b);
                }
                _ => h.end_batch(),
            },
        }
    }
});
