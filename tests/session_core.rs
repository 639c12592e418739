//! Rules of PROTOCOL.md §2–§4 and POD-LINK.md §4 that live in the sans-IO session core, tested
//! with an injected clock and a recording sink: no sockets.

use clawterm::podlink::{CloseReason, Msg as PodMsg};
use clawterm::proto::{self, Ack, Decoded, ErrorCode, FrameType, Resumed};
use clawterm::session::{
    Flow, IdSpace, Overflow, ResumeFrom, Session, SessionConfig, SessionTable, Sink, State,
};
use rand::{rngs::StdRng, SeedableRng};
use std::collections::HashSet;

/// A decoded frame the session wrote.
#[derive(Debug, Clone, PartialEq)]
struct Out {
    seq: u32,
    ty: FrameType,
    flags: u8,
    payload: Vec<u8>,
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
    bytes: Vec<u8>,
    pod: Vec<Pod>,
}

impl Sink for Rec {
    fn client(&mut self) -> &mut Vec<u8> {
        &mut self.bytes
    }
    fn pod(&mut self, _id: u32, msg: PodMsg<'_>) {
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

impl Rec {
    /// Decodes and drains everything written to the client.
    fn frames(&mut self) -> Vec<Out> {
        let mut out = Vec::new();
        let mut buf = &self.bytes[..];
        while !buf.is_empty() {
            match proto::decode(buf, 65535).expect("session wrote a broken frame") {
                Decoded::Frame(f, used) => {
                    out.push(Out {
                        seq: f.seq,
                        ty: f.ty,
                        flags: f.flags,
                        payload: f.payload.to_vec(),
                    });
                    buf = &buf[used..];
                }
                Decoded::NeedMore(_) => panic!("session wrote a partial frame"),
            }
        }
        self.bytes.clear();
        out
    }
    fn pods(&mut self) -> Vec<Pod> {
        std::mem::take(&mut self.pod)
    }
}

const ID: u32 = 0x1234_5601;

fn client_frame(ty: FrameType, seq: u32, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    proto::encode_to_vec(&mut v, ID, seq, ty, 0, payload);
    v
}

/// Feeds one client frame.
fn feed(
    s: &mut Session,
    ty: FrameType,
    seq: u32,
    payload: &[u8],
    now: u64,
    cfg: &SessionConfig,
    sink: &mut Rec,
) -> Flow {
    let bytes = client_frame(ty, seq, payload);
    let Decoded::Frame(f, _) = proto::decode(&bytes, 65535).unwrap() else {
        unreachable!()
    };
    s.on_client_frame(&f, now, cfg, sink)
}

fn new_session(caps: u8, cfg: &SessionConfig) -> (Session, Rec) {
    let _ = cfg;
    let mut s = Session::new(ID, 7, 42, caps, [9; 16], 0);
    let mut r = Rec::default();
    s.accept(
        proto::CAP_RELIABLE | proto::CAP_ROAM,
        "127.0.0.1:1",
        0,
        &mut r,
    );
    (s, r)
}

/// A 1,000-byte replay ring: ten 100-byte DATA frames fill it.
fn small_ring() -> SessionConfig {
    SessionConfig {
        ring_bytes: 1000,
        ..Default::default()
    }
}

/// An attached session whose agent sent 100 frames of 60 kB (seqs 2..=101), past the ring's
/// hard cap, so the oldest were dropped; all were sent to the client. Returns the session,
/// its (drained) recorder and the oldest SEQ still in the ring.
fn overflowed_while_attached(cfg: &SessionConfig) -> (Session, Rec, u32) {
    let (mut s, mut r) = new_session(0, cfg);
    r.frames();
    for i in 0..100u8 {
        s.on_agent_data(&[i; 60_000], 1, cfg, &mut r);
    }
    assert_eq!(data_seqs(&r.frames()), (2..=101).collect::<Vec<_>>());
    let front = s.ring().front_seq().expect("ring holds the newest");
    assert!(front > 10, "frames were dropped (front {front})");
    (s, r, front)
}

fn data_seqs(frames: &[Out]) -> Vec<u32> {
    frames
        .iter()
        .filter(|f| f.ty == FrameType::Data)
        .map(|f| f.seq)
        .collect()
}

fn resumed(frames: &[Out]) -> (Resumed, u8) {
    assert_eq!(
        frames[0].ty,
        FrameType::Resumed,
        "RESUMED must come first: {frames:?}"
    );
    (Resumed::parse(&frames[0].payload).unwrap(), frames[0].flags)
}

#[test]
fn accept_is_seq_1_and_every_frame_takes_the_next_seq() {
    let cfg = SessionConfig::default();
    let (mut s, mut r) = new_session(0, &cfg);
    let f = r.frames();
    assert_eq!((f[0].seq, f[0].ty), (1, FrameType::Accept));
    let a = proto::Accept::parse(&f[0].payload).unwrap();
    assert_eq!(
        (a.session_id, a.version, a.resume_token),
        (ID, 1, Some([9; 16]))
    );
    assert_eq!(r.pods(), vec![Pod::Open]);
    s.on_agent_data(b"a", 10, &cfg, &mut r);
    s.on_timer(cfg.keepalive_ms + 10, &cfg, &mut r);
    s.on_agent_data(b"b", cfg.keepalive_ms + 11, &cfg, &mut r);
    let f = r.frames();
    let got: Vec<(u32, FrameType)> = f.iter().map(|f| (f.seq, f.ty)).collect();
    assert_eq!(
        got,
        vec![
            (2, FrameType::Data),
            (3, FrameType::Keepalive),
            (4, FrameType::Data)
        ]
    );
}

#[test]
fn data_both_ways_and_resize_reach_the_agent() {
    let cfg = SessionConfig::default();
    let (mut s, mut r) = new_session(0, &cfg);
    r.frames();
    r.pods();
    assert_eq!(
        feed(&mut s, FrameType::Data, 5, b"ls\n", 1, &cfg, &mut r),
        Flow::Continue
    );
    assert_eq!(
        feed(
            &mut s,
            FrameType::Resize,
            6,
            &[0, 120, 0, 40],
            1,
            &cfg,
            &mut r
        ),
        Flow::Continue
    );
    assert_eq!(
        r.pods(),
        vec![Pod::Data(b"ls\n".to_vec()), Pod::Resize(120, 40)]
    );
    assert_eq!(s.last_client_seq(), 5);
    // Not RELIABLE: no ACK is ever sent.
    s.end_batch(1, &mut r);
    assert!(r.frames().is_empty());
}

#[test]
fn agent_output_is_split_at_max_payload() {
    let cfg = SessionConfig {
        max_payload: 1024,
        ..Default::default()
    };
    let (mut s, mut r) = new_session(0, &cfg);
    r.frames();
    s.on_agent_data(&vec![7u8; 2500], 1, &cfg, &mut r);
    let sizes: Vec<usize> = r.frames().iter().map(|f| f.payload.len()).collect();
    assert_eq!(sizes, vec![1024, 1024, 452]);
}

/// §7.17: by default no DATA frame carries more than 16 KiB, whatever the agent writes in one
/// go; a larger `send_payload` is honoured up to `max_payload`.
#[test]
fn agent_output_is_sent_in_frames_of_at_most_send_payload() {
    let cfg = SessionConfig::default();
    let (mut s, mut r) = new_session(0, &cfg);
    r.frames();
    s.on_agent_data(&vec![1u8; 100_000], 1, &cfg, &mut r);
    let sizes: Vec<usize> = r.frames().iter().map(|f| f.payload.len()).collect();
    assert_eq!(sizes, vec![16384, 16384, 16384, 16384, 16384, 16384, 1696]);
    let big = SessionConfig {
        send_payload: 65535,
        ..Default::default()
    };
    s.on_agent_data(&vec![2u8; 100_000], 2, &big, &mut r);
    let sizes: Vec<usize> = r.frames().iter().map(|f| f.payload.len()).collect();
    assert_eq!(sizes, vec![65535, 34465]);
    let capped = SessionConfig {
        send_payload: 65535,
        max_payload: 30_000,
        ..Default::default()
    };
    s.on_agent_data(&vec![3u8; 40_000], 3, &capped, &mut r);
    let sizes: Vec<usize> = r.frames().iter().map(|f| f.payload.len()).collect();
    assert_eq!(sizes, vec![30_000, 10_000], "never above max_payload");
}

#[test]
fn keepalive_is_never_answered_with_keepalive() {
    let cfg = SessionConfig::default();
    let (mut s, mut r) = new_session(0, &cfg);
    r.frames();
    r.pods();
    for i in 0..5 {
        assert_eq!(
            feed(&mut s, FrameType::Keepalive, i, &[], 5, &cfg, &mut r),
            Flow::Continue
        );
    }
    assert!(r.frames().is_empty());
    assert!(r.pods().is_empty());
}

#[test]
fn keepalive_after_silence_and_idle_timeout_suspends() {
    let cfg = SessionConfig {
        keepalive_ms: 1000,
        idle_ms: 3000,
        ..Default::default()
    };
    let (mut s, mut r) = new_session(0, &cfg);
    r.frames();
    r.pods();
    assert_eq!(s.next_deadline(&cfg), Some(1000));
    assert_eq!(s.on_timer(999, &cfg, &mut r), Flow::Continue);
    assert!(r.frames().is_empty());
    assert_eq!(s.on_timer(1000, &cfg, &mut r), Flow::Continue);
    assert_eq!(r.frames()[0].ty, FrameType::Keepalive);
    // Client input keeps the idle timer away.
    feed(&mut s, FrameType::Keepalive, 1, &[], 2500, &cfg, &mut r);
    assert_eq!(s.on_timer(3000, &cfg, &mut r), Flow::Continue);
    assert_eq!(s.on_timer(5500, &cfg, &mut r), Flow::Suspend);
    assert_eq!(s.state(), State::Suspended);
    assert_eq!(r.pods(), vec![Pod::Detached]);
}

#[test]
fn suspend_ttl_expiry_closes_and_tells_the_agent() {
    let cfg = SessionConfig {
        ttl_ms: 10_000,
        ..Default::default()
    };
    let (mut s, mut r) = new_session(0, &cfg);
    r.frames();
    r.pods();
    assert_eq!(
        feed(&mut s, FrameType::Suspend, 2, &[], 100, &cfg, &mut r),
        Flow::Suspend
    );
    assert!(r.frames().is_empty(), "SUSPEND is answered with nothing");
    assert_eq!(r.pods(), vec![Pod::Detached]);
    s.on_agent_data(b"while away", 200, &cfg, &mut r);
    assert_eq!(s.next_deadline(&cfg), Some(10_100));
    assert_eq!(s.on_timer(10_099, &cfg, &mut r), Flow::Continue);
    assert_eq!(s.on_timer(10_100, &cfg, &mut r), Flow::Close);
    assert_eq!(s.state(), State::Closed);
    assert_eq!(r.pods(), vec![Pod::Close(CloseReason::SuspendExpired)]);
    assert_eq!(s.ring().heap_bytes(), 0, "ring freed");
}

#[test]
fn disconnect_closes_and_frees() {
    let cfg = SessionConfig::default();
    let (mut s, mut r) = new_session(0, &cfg);
    s.on_agent_data(b"unacked", 1, &cfg, &mut r);
    r.frames();
    r.pods();
    assert_eq!(
        feed(&mut s, FrameType::Disconnect, 3, &[], 2, &cfg, &mut r),
        Flow::Close
    );
    assert!(r.frames().is_empty());
    assert_eq!(r.pods(), vec![Pod::Close(CloseReason::ClientDisconnect)]);
    assert_eq!(s.ring().heap_bytes(), 0);
}

#[test]
fn replay_after_abrupt_loss_without_acks() {
    let cfg = SessionConfig::default();
    let (mut s, mut r) = new_session(0, &cfg);
    for i in 0..5u8 {
        s.on_agent_data(&[i], 1, &cfg, &mut r);
    }
    let sent = r.frames();
    assert_eq!(data_seqs(&sent), vec![2, 3, 4, 5, 6]);
    // The client saw up to SEQ 3, then the socket died.
    s.detach(10, &cfg, &mut r);
    s.on_agent_data(b"late", 11, &cfg, &mut r); // seq 7 goes only to the ring
    assert!(r.frames().is_empty());
    assert_eq!(
        s.resume(ResumeFrom::LastSeq(3), 20, &cfg, &mut r),
        Flow::Continue
    );
    let f = r.frames();
    let (rs, flags) = resumed(&f);
    assert_eq!(flags, 0);
    assert_eq!(rs.first_replay_seq, 4);
    assert_eq!(f[0].seq, 8, "RESUMED takes the next SEQ");
    let replay: Vec<(u32, u8, Vec<u8>)> = f[1..]
        .iter()
        .map(|f| (f.seq, f.flags, f.payload.clone()))
        .collect();
    assert_eq!(
        replay,
        vec![
            (4, 1, vec![2]),
            (5, 1, vec![3]),
            (6, 1, vec![4]),
            (7, 1, b"late".to_vec())
        ],
        "exactly the missed frames, original SEQ, REPLAY flag, in order"
    );
    assert!(r.pods().contains(&Pod::Attached));
    // Live traffic continues after the replay with fresh SEQs.
    s.on_agent_data(b"live", 21, &cfg, &mut r);
    assert_eq!(r.frames()[0].seq, 9);
}

#[test]
fn replay_after_loss_with_empty_and_cumulative_acks() {
    let cfg = SessionConfig::default();
    let (mut s, mut r) = new_session(0, &cfg);
    for i in 0..6u8 {
        s.on_agent_data(&[i], 1, &cfg, &mut r); // seqs 2..=7
    }
    r.frames();
    feed(&mut s, FrameType::Ack, 2, &[], 2, &cfg, &mut r); // acks 2
    feed(&mut s, FrameType::Ack, 3, &[], 2, &cfg, &mut r); // acks 3
    feed(
        &mut s,
        FrameType::Ack,
        4,
        &5u32.to_be_bytes(),
        2,
        &cfg,
        &mut r,
    ); // acks ≤5
    assert_eq!(s.ring().len(), 2);
    s.detach(3, &cfg, &mut r);
    // Legacy resume: everything unacknowledged.
    s.resume(ResumeFrom::Unacknowledged, 4, &cfg, &mut r);
    let f = r.frames();
    let (rs, flags) = resumed(&f);
    assert_eq!((rs.first_replay_seq, flags), (6, 0));
    assert_eq!(data_seqs(&f), vec![6, 7]);
    // Empty ACKs on the new connection count the replayed frames first.
    feed(&mut s, FrameType::Ack, 5, &[], 5, &cfg, &mut r);
    assert_eq!(s.ring().front_seq(), Some(7));
}

#[test]
fn resume_with_nothing_to_replay() {
    let cfg = SessionConfig::default();
    let (mut s, mut r) = new_session(0, &cfg);
    s.on_agent_data(b"x", 1, &cfg, &mut r);
    r.frames();
    s.detach(2, &cfg, &mut r);
    s.resume(ResumeFrom::LastSeq(2), 3, &cfg, &mut r);
    let f = r.frames();
    assert_eq!(f.len(), 1);
    let (rs, flags) = resumed(&f);
    assert_eq!((rs.first_replay_seq, flags), (0, 0));
    assert!(
        s.ring().is_empty(),
        "RESUME's last_seq acknowledges what the client holds"
    );
}

#[test]
fn gap_when_overflow_dropped_what_the_client_asked_for() {
    let cfg = small_ring();
    let (mut s, mut r) = new_session(0, &cfg);
    r.frames();
    s.detach(1, &cfg, &mut r);
    for i in 0..20u8 {
        s.on_agent_data(&[i; 100], 2, &cfg, &mut r); // seqs 2..=21, ring holds 10
    }
    assert!(
        r.pods().iter().all(|p| *p != Pod::Pause),
        "drop policy never pauses a suspended session"
    );
    assert!(s.ring().payload_bytes() <= 1000);
    s.resume(ResumeFrom::LastSeq(1), 3, &cfg, &mut r);
    let f = r.frames();
    let (rs, flags) = resumed(&f);
    assert_eq!(flags & proto::FLAG_GAP, proto::FLAG_GAP);
    assert_eq!(rs.first_replay_seq, 12);
    assert_eq!(data_seqs(&f), (12..=21).collect::<Vec<_>>());
}

#[test]
fn no_gap_when_the_client_already_had_the_dropped_frames() {
    let cfg = small_ring();
    let (mut s, mut r) = new_session(0, &cfg);
    s.detach(1, &cfg, &mut r);
    for i in 0..15u8 {
        s.on_agent_data(&[i; 100], 2, &cfg, &mut r); // seqs 2..=16; 2..=6 dropped
    }
    r.frames();
    // The client had received up to 6 before the drop happened (e.g. in flight).
    s.resume(ResumeFrom::LastSeq(6), 3, &cfg, &mut r);
    let f = r.frames();
    assert_eq!(resumed(&f).1 & proto::FLAG_GAP, 0);
    assert_eq!(data_seqs(&f), (7..=16).collect::<Vec<_>>());
}

#[test]
fn pause_policy_pauses_instead_of_dropping() {
    let cfg = SessionConfig {
        ring_bytes: 1000,
        overflow: Overflow::Pause,
        ..Default::default()
    };
    let (mut s, mut r) = new_session(0, &cfg);
    s.detach(1, &cfg, &mut r);
    r.pods();
    for i in 0..10u8 {
        s.on_agent_data(&[i; 100], 2, &cfg, &mut r);
    }
    assert_eq!(r.pods(), vec![Pod::Pause]);
    // An agent still in flight when PAUSE went out loses nothing within the hard bound.
    for i in 10..15u8 {
        s.on_agent_data(&[i; 100], 2, &cfg, &mut r);
    }
    r.frames();
    s.resume(ResumeFrom::LastSeq(1), 3, &cfg, &mut r);
    let f = r.frames();
    assert_eq!(resumed(&f).1 & proto::FLAG_GAP, 0);
    assert_eq!(data_seqs(&f).len(), 15);
    // Acknowledging drains the ring below half: CONTINUE.
    feed(
        &mut s,
        FrameType::Ack,
        9,
        &12u32.to_be_bytes(),
        4,
        &cfg,
        &mut r,
    );
    assert_eq!(r.pods(), vec![Pod::Attached, Pod::Continue]);
}

#[test]
fn slow_attached_client_pauses_agent_and_continue_after_drain() {
    let cfg = small_ring();
    let (mut s, mut r) = new_session(0, &cfg);
    r.pods();
    for i in 0..10u8 {
        s.on_agent_data(&[i; 100], 1, &cfg, &mut r); // seqs 2..=11
    }
    assert_eq!(r.pods(), vec![Pod::Pause]);
    assert_eq!(data_seqs(&r.frames()).len(), 10, "nothing dropped");
    feed(
        &mut s,
        FrameType::Ack,
        1,
        &6u32.to_be_bytes(),
        2,
        &cfg,
        &mut r,
    );
    assert!(r.pods().is_empty(), "still at half or more");
    feed(&mut s, FrameType::Ack, 2, &[], 2, &cfg, &mut r);
    assert_eq!(r.pods(), vec![Pod::Continue]);
}

#[test]
fn takeover_tells_the_old_connection_and_keeps_the_session() {
    let cfg = SessionConfig::default();
    let (mut s, mut old) = new_session(0, &cfg);
    s.on_agent_data(b"one", 1, &cfg, &mut old);
    old.frames();
    assert_eq!(old.pods(), vec![Pod::Open]);
    let mut new = Rec::default();
    s.take_over(2, &mut old);
    let f = old.frames();
    assert_eq!(f.len(), 1);
    assert_eq!(f[0].ty, FrameType::Error);
    assert_eq!(
        u16::from_be_bytes([f[0].payload[0], f[0].payload[1]]),
        ErrorCode::TakenOver as u16
    );
    assert_eq!(
        s.resume(ResumeFrom::LastSeq(1), 2, &cfg, &mut new),
        Flow::Continue
    );
    let f = new.frames();
    assert_eq!(f[0].ty, FrameType::Resumed, "{f:?}");
    assert_eq!(data_seqs(&f), vec![2]);
    assert_eq!(s.state(), State::Attached);
    // §7.10: the session never stopped being attached, so the agent hears nothing of it:
    // neither DETACHED at the takeover nor ATTACHED at the resume that follows.
    assert_eq!(old.pods(), vec![], "pod messages at the takeover");
    assert_eq!(
        new.pods(),
        vec![],
        "pod messages at the resume after a takeover"
    );
    // A resume after a real loss still tells the agent both.
    s.detach(3, &cfg, &mut new);
    assert_eq!(new.pods(), vec![Pod::Detached]);
    let mut third = Rec::default();
    s.resume(ResumeFrom::LastSeq(2), 4, &cfg, &mut third);
    assert_eq!(third.pods(), vec![Pod::Attached]);
}

#[test]
fn wrong_session_id_is_a_protocol_violation_and_not_counted() {
    let cfg = SessionConfig::default();
    let (mut s, mut r) = new_session(0, &cfg);
    r.frames();
    r.pods();
    let mut v = Vec::new();
    proto::encode_to_vec(&mut v, ID + 1, 77, FrameType::Data, 0, b"evil");
    let Decoded::Frame(f, _) = proto::decode(&v, 65535).unwrap() else {
        unreachable!()
    };
    assert_eq!(s.on_client_frame(&f, 1, &cfg, &mut r), Flow::Suspend);
    let out = r.frames();
    assert_eq!(out[0].ty, FrameType::Error);
    assert_eq!(
        u16::from_be_bytes([out[0].payload[0], out[0].payload[1]]),
        ErrorCode::ProtocolViolation as u16
    );
    assert_eq!(s.last_client_seq(), 0, "a refused frame is never counted");
    assert_eq!(r.pods(), vec![Pod::Detached], "no data reached the agent");
    assert_eq!(
        s.state(),
        State::Suspended,
        "bad input never costs the session"
    );
}

#[test]
fn second_connect_and_malformed_payloads_are_violations() {
    let cfg = SessionConfig::default();
    for (ty, payload) in [
        (FrameType::Connect, vec![1u8; 58]),
        (FrameType::Resume, vec![0u8; 24]),
        (FrameType::Ack, vec![0u8; 3]),
        (FrameType::Resize, vec![0u8; 5]),
        (FrameType::Accept, vec![]),
    ] {
        let (mut s, mut r) = new_session(0, &cfg);
        r.frames();
        assert_eq!(
            feed(&mut s, ty, 2, &payload, 1, &cfg, &mut r),
            Flow::Suspend,
            "{ty}"
        );
        let f = r.frames();
        assert_eq!(
            u16::from_be_bytes([f[0].payload[0], f[0].payload[1]]),
            ErrorCode::ProtocolViolation as u16
        );
    }
}

#[test]
fn unknown_types_and_nack_are_ignored() {
    let cfg = SessionConfig::default();
    let (mut s, mut r) = new_session(0, &cfg);
    r.frames();
    r.pods();
    assert_eq!(
        feed(&mut s, FrameType::Unknown(0x77), 2, b"?", 1, &cfg, &mut r),
        Flow::Continue
    );
    assert_eq!(
        feed(&mut s, FrameType::Nack, 3, b"", 1, &cfg, &mut r),
        Flow::Continue
    );
    assert!(r.frames().is_empty() && r.pods().is_empty());
}

#[test]
fn reliable_clients_get_one_coalesced_cumulative_ack_per_batch() {
    let cfg = SessionConfig::default();
    let (mut s, mut r) = new_session(proto::CAP_RELIABLE, &cfg);
    r.frames();
    for q in 10..15 {
        feed(&mut s, FrameType::Data, q, b"k", 1, &cfg, &mut r);
    }
    s.end_batch(1, &mut r);
    s.end_batch(1, &mut r);
    let f = r.frames();
    assert_eq!(f.len(), 1);
    assert_eq!(f[0].ty, FrameType::Ack);
    assert_eq!(Ack::parse(&f[0].payload).unwrap(), Ack::Cumulative(14));
    // The resend rule: after a resume, RESUMED tells the client what the server has.
    s.detach(2, &cfg, &mut r);
    s.resume(ResumeFrom::LastSeq(0), 3, &cfg, &mut r);
    assert_eq!(resumed(&r.frames()).0.last_client_seq, 14);
}

#[test]
fn agent_close_while_attached_sends_disconnect_after_output() {
    let cfg = SessionConfig::default();
    let (mut s, mut r) = new_session(0, &cfg);
    s.on_agent_data(b"bye", 1, &cfg, &mut r);
    assert_eq!(s.on_agent_close(1, &mut r), Flow::Close);
    let tys: Vec<FrameType> = r.frames().iter().map(|f| f.ty).collect();
    assert_eq!(
        tys,
        vec![FrameType::Accept, FrameType::Data, FrameType::Disconnect]
    );
}

#[test]
fn agent_close_while_suspended_keeps_output_until_resume() {
    let cfg = SessionConfig::default();
    let (mut s, mut r) = new_session(0, &cfg);
    r.frames();
    s.detach(1, &cfg, &mut r);
    s.on_agent_data(b"last words", 2, &cfg, &mut r);
    assert_eq!(s.on_agent_close(3, &mut r), Flow::Continue);
    assert_eq!(s.state(), State::Suspended);
    r.pods();
    assert_eq!(
        s.resume(ResumeFrom::LastSeq(1), 4, &cfg, &mut r),
        Flow::Close
    );
    let f = r.frames();
    let tys: Vec<FrameType> = f.iter().map(|f| f.ty).collect();
    assert_eq!(
        tys,
        vec![FrameType::Resumed, FrameType::Data, FrameType::Disconnect]
    );
    assert_eq!(f[1].payload, b"last words");
    assert!(
        r.pods().is_empty(),
        "the agent already closed: nothing more is sent to it"
    );
}

#[test]
fn seq_wraps_with_serial_arithmetic() {
    let cfg = SessionConfig::default();
    let mut s = Session::new(ID, 7, 42, 0, [9; 16], 0).with_next_seq(u32::MAX - 1);
    let mut r = Rec::default();
    for i in 0..4u8 {
        s.on_agent_data(&[i], 1, &cfg, &mut r);
    }
    assert_eq!(data_seqs(&r.frames()), vec![u32::MAX - 1, u32::MAX, 0, 1]);
    s.detach(2, &cfg, &mut r);
    s.resume(ResumeFrom::LastSeq(u32::MAX), 3, &cfg, &mut r);
    let f = r.frames();
    assert_eq!(resumed(&f).0.first_replay_seq, 0);
    assert_eq!(data_seqs(&f), vec![0, 1], "0 and 1 are newer than 2^32-1");
    feed(
        &mut s,
        FrameType::Ack,
        1,
        &0u32.to_be_bytes(),
        4,
        &cfg,
        &mut r,
    );
    assert_eq!(s.ring().front_seq(), Some(1));
}

#[test]
fn ids_are_unique_nonzero_and_encode_the_shard() {
    for shards in [1usize, 2, 3, 16] {
        for shard in 0..shards {
            let space = IdSpace::new(shard, shards);
            let mut t = SessionTable::with_rng(space, StdRng::seed_from_u64(shard as u64));
            let mut seen = HashSet::new();
            for _ in 0..5_000 {
                let id = t.create(|id, tok| Session::new(id, 1, 1, 0, tok, 0)).id();
                assert_ne!(id, 0);
                assert_eq!(space.owner(id), shard);
                assert!(seen.insert(id), "duplicate id");
            }
            assert_eq!(t.len(), 5_000);
        }
    }
}

/// A random source that repeats each value of a tiny range several times, counting its draws:
/// forces the id-collision (and zero-id) retries that 32 random bits practically never hit.
struct Repeating {
    next: u32,
    range: u32,
    repeat: u32,
    draws: std::rc::Rc<std::cell::Cell<u32>>,
}

impl rand::RngCore for Repeating {
    fn next_u32(&mut self) -> u32 {
        self.draws.set(self.draws.get() + 1);
        let v = (self.next / self.repeat) % self.range;
        self.next += 1;
        v
    }
    fn next_u64(&mut self) -> u64 {
        self.next_u32() as u64
    }
    fn fill_bytes(&mut self, dest: &mut [u8]) {
        dest.fill(0x5A);
    }
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand::Error> {
        self.fill_bytes(dest);
        Ok(())
    }
}

#[test]
fn ids_stay_unique_when_the_random_source_repeats_itself() {
    for (shard, shards) in [(0usize, 1usize), (3, 4)] {
        let space = IdSpace::new(shard, shards);
        let draws = std::rc::Rc::new(std::cell::Cell::new(0));
        // Values 0..6, each drawn three times in a row: 0 0 0 1 1 1 2 2 2 …
        let rng = Repeating {
            next: 0,
            range: 6,
            repeat: 3,
            draws: draws.clone(),
        };
        let mut t = SessionTable::with_rng(space, rng);
        let create = |t: &mut SessionTable<Repeating>| {
            t.create(|id, tok| Session::new(id, 1, 1, 0, tok, 0)).id()
        };
        // With one shard, random 0 gives id 0, which is never issued: ids 1..=5 remain.
        let usable = if shards == 1 { 5 } else { 6 };
        let mut ids: Vec<u32> = (0..usable).map(|_| create(&mut t)).collect();
        let distinct: HashSet<u32> = ids.iter().copied().collect();
        assert_eq!(distinct.len(), usable, "duplicate ids: {ids:?}");
        for &id in &ids {
            assert_ne!(id, 0);
            assert_eq!(space.owner(id), shard, "{id:#x}");
        }
        // Every value came up three times: far more draws than ids, i.e. the retry ran.
        assert!(
            draws.get() >= 2 * usable as u32,
            "{} draws for {usable} ids: the collision retry never ran",
            draws.get()
        );
        // The space is full; a freed id is the only one left and is found again.
        let freed = ids.remove(2);
        t.remove(freed);
        let again = create(&mut t);
        assert_eq!(again, freed, "the only free id");
        assert!(!ids.contains(&again));
        assert_eq!(t.len(), usable);
    }
}

#[test]
fn resume_tokens_are_checked_and_random() {
    let mut t = SessionTable::new(IdSpace::new(0, 1));
    let (id, tok) = {
        let s = t.create(|id, tok| Session::new(id, 1, 1, 0, tok, 0));
        (s.id(), *s.resume_token())
    };
    assert!(t.get_with_token(id, &tok).is_some());
    let mut wrong = tok;
    wrong[15] ^= 1;
    assert!(t.get_with_token(id, &wrong).is_none());
    assert!(t.get_with_token(id ^ 0x100, &tok).is_none());
    let other = *t
        .create(|id, tok| Session::new(id, 1, 1, 0, tok, 0))
        .resume_token();
    assert_ne!(tok, other);
    assert_ne!(tok, [0; 16]);
}

#[test]
fn idle_session_in_table_is_small() {
    // The measured figure comes from `cargo bench --bench session_memory`; this guards the
    // inline size so a careless field cannot silently blow the budget.
    let size = std::mem::size_of::<Option<Session>>();
    assert!(size <= 160, "Session is {size} bytes");
}

#[test]
fn agent_gone_attached_and_suspended() {
    let cfg = SessionConfig::default();
    let (mut s, mut r) = new_session(0, &cfg);
    s.on_agent_data(b"out", 1, &cfg, &mut r);
    assert_eq!(s.on_agent_gone(2, &mut r), Flow::Close);
    let f = r.frames();
    let tys: Vec<FrameType> = f.iter().map(|f| f.ty).collect();
    assert_eq!(
        tys,
        vec![
            FrameType::Accept,
            FrameType::Data,
            FrameType::Error,
            FrameType::Disconnect
        ]
    );
    assert_eq!(
        u16::from_be_bytes([f[2].payload[0], f[2].payload[1]]),
        ErrorCode::AgentGone as u16
    );

    let (mut s, mut r) = new_session(0, &cfg);
    r.frames();
    s.detach(1, &cfg, &mut r);
    s.on_agent_data(b"kept", 2, &cfg, &mut r);
    assert_eq!(s.on_agent_gone(3, &mut r), Flow::Continue);
    r.pods();
    assert_eq!(
        s.resume(ResumeFrom::LastSeq(1), 4, &cfg, &mut r),
        Flow::Close
    );
    let tys: Vec<FrameType> = r.frames().iter().map(|f| f.ty).collect();
    assert_eq!(
        tys,
        vec![
            FrameType::Resumed,
            FrameType::Data,
            FrameType::Error,
            FrameType::Disconnect
        ]
    );
    assert!(r.pods().is_empty(), "nothing is sent to a gone agent");
}

/// §2.5 with overflow while attached (an agent ignoring PAUSE past the hard cap): frames the
/// client was sent but the ring dropped still count for empty ACKs, and a cumulative ACK
/// acknowledges those it covers — so the k-th empty ACK after it is the k-th frame newer than
/// the cumulative ACK, never an older one again.
#[test]
fn empty_acks_after_a_cumulative_ack_skip_dropped_frames_it_covered() {
    let cfg = SessionConfig {
        send_payload: 65535,
        ..small_ring()
    };
    let (mut s, mut r, front) = overflowed_while_attached(&cfg);
    // The client acknowledges through the middle of the dropped ones, cumulatively…
    let through = 2 + (front - 2) / 2;
    feed(
        &mut s,
        FrameType::Ack,
        2,
        &through.to_be_bytes(),
        2,
        &cfg,
        &mut r,
    );
    // … then sends one empty ACK per dropped frame newer than that, plus three.
    let empties = (front - 1 - through) + 3;
    for i in 0..empties {
        feed(&mut s, FrameType::Ack, 3 + i, &[], 2, &cfg, &mut r);
    }
    // Exactly the three oldest frames still in the ring were acknowledged.
    assert_eq!(s.ring().front_seq(), Some(front + 3));
    s.detach(3, &cfg, &mut r);
    s.resume(ResumeFrom::Unacknowledged, 4, &cfg, &mut r);
    let f = r.frames();
    assert_eq!(
        resumed(&f).1 & proto::FLAG_GAP,
        0,
        "nothing unacknowledged was lost"
    );
    assert_eq!(data_seqs(&f).first(), Some(&(front + 3)));
}

/// A 24-byte RESUME's last_seq acknowledges frames overflow had dropped too: a later legacy
/// RESUME (everything unacknowledged) must not report them as a GAP.
#[test]
fn last_seq_acknowledges_dropped_frames_for_a_later_legacy_resume() {
    let cfg = small_ring();
    let (mut s, mut r) = new_session(0, &cfg);
    s.detach(1, &cfg, &mut r);
    for i in 0..20u8 {
        s.on_agent_data(&[i; 100], 2, &cfg, &mut r); // seqs 2..=21; 2..=11 dropped
    }
    r.frames();
    // The client had everything through 11 before it left.
    s.resume(ResumeFrom::LastSeq(11), 3, &cfg, &mut r);
    let f = r.frames();
    assert_eq!(resumed(&f).1 & proto::FLAG_GAP, 0);
    assert_eq!(data_seqs(&f), (12..=21).collect::<Vec<_>>());
    s.detach(4, &cfg, &mut r);
    s.resume(ResumeFrom::Unacknowledged, 5, &cfg, &mut r);
    let f = r.frames();
    assert_eq!(
        resumed(&f).1 & proto::FLAG_GAP,
        0,
        "frames the client had acknowledged are no GAP"
    );
    assert_eq!(data_seqs(&f), (12..=21).collect::<Vec<_>>());
}

/// §2.4/§2.5: a cumulative ACK acknowledges every frame up to its SEQ, frames overflow had
/// already dropped included, even when no frame still in the ring is that old: a later legacy
/// RESUME (everything unacknowledged) must not report them as a GAP. (Found with the session fuzz
/// target once its GAP check was made exact, on a seed written for the case.)
#[test]
fn cumulative_ack_of_dropped_frames_only_is_no_gap_for_a_later_legacy_resume() {
    let cfg = SessionConfig {
        send_payload: 65535,
        ..small_ring()
    };
    let (mut s, mut r, front) = overflowed_while_attached(&cfg);
    // The client acknowledges exactly the dropped frames: nothing leaves the ring.
    let through = front - 1;
    feed(
        &mut s,
        FrameType::Ack,
        2,
        &through.to_be_bytes(),
        2,
        &cfg,
        &mut r,
    );
    assert_eq!(s.ring().front_seq(), Some(front));
    s.detach(3, &cfg, &mut r);
    s.resume(ResumeFrom::Unacknowledged, 4, &cfg, &mut r);
    let f = r.frames();
    assert_eq!(
        resumed(&f).1 & proto::FLAG_GAP,
        0,
        "frames the client had acknowledged are no GAP"
    );
    assert_eq!(data_seqs(&f), (front..=101).collect::<Vec<_>>());
}

/// The same after the counter wrapped: SEQ 0 is then a frame like any other, so `last_seq` 0
/// acknowledges the dropped frames up to it (the ring's frames up to 0 already left), and a later
/// legacy RESUME reports no GAP. (Found with the session fuzz target's exact GAP check, on a
/// hand-written input.)
#[test]
fn last_seq_zero_after_the_wrap_acknowledges_dropped_frames() {
    let cfg = small_ring();
    let mut s = Session::new(ID, 7, 42, 0, [9; 16], 0).with_next_seq(u32::MAX - 1);
    let mut r = Rec::default();
    s.accept(proto::CAP_RELIABLE, "127.0.0.1:1", 0, &mut r);
    r.frames();
    s.detach(1, &cfg, &mut r);
    for i in 0..7u8 {
        // seqs u32::MAX, 0, 1, …, 5; u32::MAX and 0 dropped
        s.on_agent_data(&[i; 200], 2, &cfg, &mut r);
    }
    assert_eq!(s.ring().front_seq(), Some(1));
    s.resume(ResumeFrom::LastSeq(0), 3, &cfg, &mut r);
    let f = r.frames();
    assert_eq!(resumed(&f).1 & proto::FLAG_GAP, 0);
    assert_eq!(data_seqs(&f), (1..=5).collect::<Vec<_>>());
    s.detach(4, &cfg, &mut r);
    s.resume(ResumeFrom::Unacknowledged, 5, &cfg, &mut r);
    let f = r.frames();
    assert_eq!(
        resumed(&f).1 & proto::FLAG_GAP,
        0,
        "frames the client had acknowledged are no GAP"
    );
    assert_eq!(data_seqs(&f), (1..=5).collect::<Vec<_>>());
}

// ---- §7.16: clients that do not acknowledge ----

/// An attached session whose agent filled the ring (10 frames of 100 bytes, seqs 2..=11, all
/// sent) and was PAUSEd. Returns it with the recorder drained.
fn paused_by_a_full_ring(cfg: &SessionConfig) -> (Session, Rec) {
    let (mut s, mut r) = new_session(0, cfg);
    r.frames();
    r.pods();
    for i in 0..10u8 {
        s.on_agent_data(&[i; 100], 5, cfg, &mut r);
    }
    assert_eq!(data_seqs(&r.frames()), (2..=11).collect::<Vec<_>>());
    assert_eq!(r.pods(), vec![Pod::Pause]);
    (s, r)
}

/// A client that reads everything but never acknowledges: two delivery checks `ack_wait_ms`
/// apart that find everything delivered turn the connection unacknowledged; the agent gets
/// CONTINUE, the ring keeps the newest `ring_bytes` while the client stays attached, the send
/// backlog paces the agent from then on, and a RESUME after an abrupt loss reports GAP and
/// replays the newest output.
#[test]
fn a_client_that_never_acknowledges_does_not_stop_its_agent() {
    let cfg = small_ring();
    let (mut s, mut r) = paused_by_a_full_ring(&cfg);
    let first = s.delivery_check().expect("a delivery check is filed");
    assert_eq!(first, 5 + cfg.ack_wait_ms);
    assert!(s.next_deadline(&cfg).unwrap() <= first);
    // Too early: nothing. Not delivered yet (the client is slow): still paused.
    assert!(!s.on_delivery(true, first - 1, &cfg, &mut r));
    assert!(!s.on_delivery(false, first, &cfg, &mut r));
    assert!(r.pods().is_empty() && s.pod_paused());
    // Delivered at one check: wait one more ack_wait_ms for an ACK.
    let second = s.delivery_check().unwrap();
    assert_eq!(second, first + cfg.ack_wait_ms);
    assert!(!s.on_delivery(true, second, &cfg, &mut r));
    assert!(r.pods().is_empty() && s.pod_paused());
    // Still delivered, still no ACK: the connection does not acknowledge.
    let third = s.delivery_check().unwrap();
    assert!(s.on_delivery(true, third, &cfg, &mut r));
    assert!(s.unacknowledged() && !s.pod_paused());
    assert_eq!(r.pods(), vec![Pod::Continue]);
    assert_eq!(s.delivery_check(), None);
    // Output keeps flowing to the client; the ring keeps the newest 1,000 bytes.
    for i in 0..25u8 {
        s.on_agent_data(&[100 + i; 100], third + 1, &cfg, &mut r);
    }
    assert_eq!(data_seqs(&r.frames()), (12..=36).collect::<Vec<_>>());
    assert!(r.pods().is_empty(), "no PAUSE from the ring any more");
    assert_eq!(s.ring().payload_bytes(), 1000);
    assert_eq!(s.ring().front_seq(), Some(27));
    // The send backlog paces the agent.
    s.on_send_backlog(true, &mut r);
    s.on_send_backlog(true, &mut r);
    assert_eq!(r.pods(), vec![Pod::Pause]);
    s.on_send_backlog(false, &mut r);
    assert_eq!(r.pods(), vec![Pod::Continue]);
    // Abrupt loss, then a 24-byte RESUME from what the client had seen before: GAP, newest.
    s.detach(third + 2, &cfg, &mut r);
    assert_eq!(r.pods(), vec![Pod::Detached]);
    s.resume(ResumeFrom::LastSeq(20), third + 3, &cfg, &mut r);
    let f = r.frames();
    let (res, flags) = resumed(&f);
    assert_eq!(flags & proto::FLAG_GAP, proto::FLAG_GAP);
    assert_eq!(res.first_replay_seq, 27);
    assert_eq!(data_seqs(&f[1..]), (27..=36).collect::<Vec<_>>());
    assert!(!s.unacknowledged(), "a new connection starts acknowledging");
}

/// The legacy RESUME of a client that never acknowledges replays what is still in the ring.
#[test]
fn legacy_resume_of_a_never_acknowledging_client_replays_the_newest() {
    let cfg = small_ring();
    let (mut s, mut r) = paused_by_a_full_ring(&cfg);
    let c = s.delivery_check().unwrap();
    s.on_delivery(true, c, &cfg, &mut r);
    assert!(s.on_delivery(true, c + cfg.ack_wait_ms, &cfg, &mut r));
    for i in 0..5u8 {
        s.on_agent_data(&[i; 100], c + 300, &cfg, &mut r);
    }
    r.frames();
    s.detach(c + 400, &cfg, &mut r);
    s.resume(ResumeFrom::Unacknowledged, c + 500, &cfg, &mut r);
    let f = r.frames();
    let (res, flags) = resumed(&f);
    assert_eq!(flags & proto::FLAG_GAP, proto::FLAG_GAP);
    assert_eq!(res.first_replay_seq, 7);
    assert_eq!(data_seqs(&f[1..]), (7..=16).collect::<Vec<_>>());
}

/// A client that acknowledges keeps lossless flow control: an ACK between two checks restarts
/// the wait, and once its ACKs drain the ring the agent gets CONTINUE and no check is left.
#[test]
fn an_acknowledging_client_is_never_switched() {
    let cfg = small_ring();
    let (mut s, mut r) = paused_by_a_full_ring(&cfg);
    let c = s.delivery_check().unwrap();
    assert!(!s.on_delivery(true, c, &cfg, &mut r));
    // One cumulative ACK of the two oldest: still over half, still paused, but acknowledging.
    let mut p = Vec::new();
    Ack::Cumulative(3).encode(&mut p);
    feed(&mut s, FrameType::Ack, 2, &p, c + 10, &cfg, &mut r);
    let c2 = s.delivery_check().unwrap();
    assert!(
        !s.on_delivery(true, c2, &cfg, &mut r),
        "the ACK restarted the wait"
    );
    assert!(r.pods().is_empty() && s.pod_paused() && !s.unacknowledged());
    // Empty ACKs drain it below half: CONTINUE, nothing dropped, no check left.
    for k in 0..4 {
        feed(&mut s, FrameType::Ack, 3 + k, &[], c2 + 1, &cfg, &mut r);
    }
    assert_eq!(r.pods(), vec![Pod::Continue]);
    assert_eq!(s.delivery_check(), None);
    assert_eq!(
        s.ring().front_seq(),
        Some(8),
        "only acknowledged frames left the ring"
    );
}

/// With `--overflow pause` nothing is ever dropped: no delivery check is filed.
#[test]
fn pause_policy_never_switches_a_connection() {
    let cfg = SessionConfig {
        overflow: Overflow::Pause,
        ..small_ring()
    };
    let (s, _r) = paused_by_a_full_ring(&cfg);
    assert_eq!(s.delivery_check(), None);
}

/// POD-LINK.md §4: a session paused while attached, then cut off, under `--overflow drop`:
/// CONTINUE right after DETACHED, output keeps coming (the ring drops its oldest), and the
/// RESUME gets GAP and the newest output. Under `--overflow pause` it stays paused and nothing
/// is lost.
#[test]
fn a_session_paused_while_attached_continues_once_suspended_under_drop() {
    let cfg = small_ring();
    let (mut s, mut r) = paused_by_a_full_ring(&cfg);
    s.detach(6, &cfg, &mut r);
    assert_eq!(r.pods(), vec![Pod::Detached, Pod::Continue]);
    assert!(!s.pod_paused());
    assert_eq!(s.delivery_check(), None);
    for i in 0..5u8 {
        s.on_agent_data(&[50 + i; 100], 7, &cfg, &mut r);
    }
    assert!(r.pods().is_empty(), "no PAUSE while suspended under drop");
    s.resume(ResumeFrom::LastSeq(1), 8, &cfg, &mut r);
    let f = r.frames();
    let (res, flags) = resumed(&f);
    assert_eq!(flags & proto::FLAG_GAP, proto::FLAG_GAP);
    assert_eq!(res.first_replay_seq, 7);
    assert_eq!(data_seqs(&f[1..]), (7..=16).collect::<Vec<_>>());

    let cfg = SessionConfig {
        overflow: Overflow::Pause,
        ..small_ring()
    };
    let (mut s, mut r) = paused_by_a_full_ring(&cfg);
    s.detach(6, &cfg, &mut r);
    assert_eq!(r.pods(), vec![Pod::Detached]);
    assert!(s.pod_paused());
    s.resume(ResumeFrom::LastSeq(1), 8, &cfg, &mut r);
    let f = r.frames();
    let (res, flags) = resumed(&f);
    assert_eq!(flags & proto::FLAG_GAP, 0);
    assert_eq!(res.first_replay_seq, 2);
    assert_eq!(data_seqs(&f[1..]), (2..=11).collect::<Vec<_>>());
}

/// A take-over or a RESUME starts a new connection afresh: an unacknowledged connection's
/// backlog pause is lifted by the new one's ACKs or delivery checks, never left for ever.
#[test]
fn a_resume_after_a_backlog_pause_files_a_check() {
    let cfg = small_ring();
    let (mut s, mut r) = paused_by_a_full_ring(&cfg);
    let c = s.delivery_check().unwrap();
    s.on_delivery(true, c, &cfg, &mut r);
    assert!(s.on_delivery(true, c + cfg.ack_wait_ms, &cfg, &mut r));
    s.on_send_backlog(true, &mut r);
    r.pods();
    let mut old = Rec::default();
    s.take_over(c + 300, &mut old);
    s.resume(ResumeFrom::Unacknowledged, c + 300, &cfg, &mut r);
    assert!(s.pod_paused() && !s.unacknowledged());
    assert_eq!(s.delivery_check(), Some(c + 300 + cfg.ack_wait_ms));
}

/// The pod's PAUSE and CONTINUE of a session's input (POD-LINK.md §4) are remembered across
/// connections; repeating one changes nothing.
#[test]
fn pod_input_pause_is_a_session_state() {
    let cfg = SessionConfig::default();
    let (mut s, mut r) = new_session(0, &cfg);
    assert!(!s.input_paused());
    assert!(s.on_pod_input(true));
    assert!(!s.on_pod_input(true));
    s.detach(1, &cfg, &mut r);
    s.resume(ResumeFrom::Unacknowledged, 2, &cfg, &mut r);
    assert!(s.input_paused());
    assert!(s.on_pod_input(false));
    assert!(!s.input_paused());
    assert!(
        !r.pods().contains(&Pod::Pause),
        "input flow is not echoed to the pod"
    );
}
