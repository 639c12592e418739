//! Fuzzes the client library's sans-IO core (`client::core::ClientCore`) the way the blocking
//! session drives it, with a hostile or broken server on the other end. The input is a script:
//! server bytes (well-formed frames of every type with arbitrary SEQ, FLAGS and payloads, raw
//! bytes, frames with a bad CRC), cut at arbitrary points into `on_bytes` calls, interleaved with
//! the application's calls (`send_data`, `resize`, `suspend`, `disconnect`), timer ticks at
//! arbitrary later times, and lost connections followed by RESUME (or CONNECT while there is no
//! session yet). The core starts either fresh (CONNECT) or from saved credentials (RESUME).
//!
//! A model kept next to the core, built from the bytes the server sent on the current
//! connection (decoded with the project's decoder and typed parsers) and from the application's
//! calls, says what the core must do; after every call the target checks that
//! * it never panics, and every byte it writes decodes, one whole frame after another, with the
//!   session's id (0 on CONNECT) and the next client SEQ (RESUMED may move the counter past
//!   `last_client_seq` when nothing is waiting), or the original SEQ for resent DATA;
//! * the events are exactly the ones the server's frames call for: ACCEPT only while
//!   connecting, RESUMED only while resuming, and then DATA, ACK, KEEPALIVE, NACK and unknown
//!   types until ERROR / DISCONNECT / ROAM or anything else ends the connection (a protocol
//!   error, as is a broken frame);
//! * de-duplication: `Data` is reported only for a DATA frame newer (serial arithmetic) than
//!   every one delivered before in the session, never an empty one, and `last_seq` is the
//!   newest delivered — so replayed frames the client already holds are never shown again;
//! * one coalesced cumulative ACK per `on_bytes` call at most, for exactly the newest DATA, and
//!   only when it is newer than the last ACK; a KEEPALIVE is never an answer to received bytes
//!   (only `tick` sends one, and only once its deadline has come);
//! * RELIABLE: DATA the application sent is kept until the server acknowledges it (cumulative
//!   ACK, or RESUMED's `last_client_seq`) and resent after ACCEPT / RESUMED, in order with its
//!   original SEQ and bytes; RESUME carries the newest delivered SEQ and the current token;
//! * after the session is closed nothing more is written or reported.
#![no_main]

use clawterm_client::core::{ClientCore, CoreEvent, Timers};
use clawterm::proto::{
    decode, encode_to_vec, seq, Accept, Ack, Decoded, ErrorFrame, FrameType, Resize,
    Resume, Resumed, Roam, CAP_RELIABLE, FLAG_GAP, FLAG_REPLAY, MAX_PAYLOAD,
};
use libfuzzer_sys::fuzz_target;
use std::collections::VecDeque;

const MAX_SEND_CHUNK: usize = clawterm_client::core::MAX_SEND_CHUNK;

/// What a client does after an ERROR, as PROTOCOL.md §6 says it (the "a client then" column),
/// read from the text itself so that the model cannot share a mistake with the code.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum AfterError {
    Resumes,
    Stops,
    /// NO_AGENT: stops after a CONNECT, resumes after a RESUME.
    StopsAfterConnect,
    Over,
}

fn after_error(code: u16) -> AfterError {
    static TABLE: std::sync::OnceLock<Vec<(u16, AfterError)>> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let text = include_str!("../../docs/PROTOCOL.md");
        let section = text
            .split("## 6. Errors and bad input")
            .nth(1)
            .and_then(|t| t.split("\n## ").next())
            .expect("PROTOCOL.md has section 6");
        let rows: Vec<(u16, AfterError)> = section
            .lines()
            .filter_map(|l| {
                let cells: Vec<&str> = l.split('|').map(str::trim).collect();
                // ["", code, name, after it, a client then, ""]
                let code = cells.get(1)?.parse::<u16>().ok()?;
                let rule = match *cells.get(4)? {
                    "resumes" => AfterError::Resumes,
                    "stops" => AfterError::Stops,
                    "stops after a CONNECT, resumes after a RESUME" => {
                        AfterError::StopsAfterConnect
                    }
                    "the session is over" => AfterError::Over,
                    other => panic!("PROTOCOL.md §6: unknown client rule {other:?}"),
                };
                Some((code, rule))
            })
            .collect();
        assert_eq!(rows.len(), 12, "PROTOCOL.md §6 lists the 12 codes");
        rows
    });
    table
        .iter()
        .find(|(c, _)| *c == code)
        .map_or(AfterError::Resumes, |(_, r)| *r) // an unknown code: resumes
}
const TIMERS: Timers = Timers {
    keepalive_ms: 1_000,
    dead_after_ms: 5_000,
};

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
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum Phase {
    Down,
    Connecting,
    Resuming,
    Attached,
    Closed,
}

/// What the core must have done, kept by the target.
struct Model {
    phase: Phase,
    session_id: u32,
    token: [u8; 16],
    reliable: bool,
    /// SEQ of the next frame the client sends.
    next: u32,
    /// Newest server DATA SEQ delivered.
    highest: Option<u32>,
    /// Newest SEQ acknowledged to the server.
    acked: Option<u32>,
    /// Client DATA not yet acknowledged by the server.
    unacked: VecDeque<(u32, Vec<u8>)>,
    pending_resize: Option<(u16, u16)>,
    /// Bytes the server sent on this connection, and how many the model has gone through.
    stream: Vec<u8>,
    done: usize,
    /// The model stopped reading this connection (it ended, or the stream broke).
    stopped: bool,
    now: u64,
}

impl Model {
    fn take_seq(&mut self) -> u32 {
        let s = self.next;
        self.next = self.next.wrapping_add(1);
        if self.next == 0 {
            self.next = 1;
        }
        s
    }
}

/// One decoded client frame.
#[derive(Debug)]
struct Out {
    sid: u32,
    seq: u32,
    ty: FrameType,
    flags: u8,
    payload: Vec<u8>,
}

fn frames(bytes: &[u8]) -> Vec<Out> {
    let mut v = Vec::new();
    let mut rest = bytes;
    while !rest.is_empty() {
        match decode(rest, MAX_PAYLOAD) {
            Ok(Decoded::Frame(f, used)) => {
                v.push(Out {
                    sid: f.session_id,
                    seq: f.seq,
                    ty: f.ty,
                    flags: f.flags,
                    payload: f.payload.to_vec(),
                });
                rest = &rest[used..];
            }
            other => panic!("client wrote a broken or partial frame: {other:?}"),
        }
    }
    v
}

/// Checks one frame the client sent anew (not a resend): the session's id and the next SEQ.
fn fresh(m: &mut Model, f: &Out, ty: FrameType) {
    assert_eq!(f.ty, ty);
    assert_eq!(f.flags, 0);
    let sid = if ty == FrameType::Connect {
        0
    } else {
        m.session_id
    };
    assert_eq!(f.sid, sid, "{ty:?} with the wrong session id");
    let s = m.take_seq();
    assert_eq!(f.seq, s, "{ty:?} took SEQ {} instead of {s}", f.seq);
}

/// Attaching (ACCEPT / RESUMED): the pending RESIZE, then every unacknowledged DATA frame.
fn expect_attach(m: &mut Model, out: &mut VecDeque<Out>) -> usize {
    m.phase = Phase::Attached;
    if let Some((c, r)) = m.pending_resize.take() {
        let f = out.pop_front().expect("pending RESIZE not sent");
        fresh(m, &f, FrameType::Resize);
        assert_eq!(
            Resize::parse(&f.payload).unwrap(),
            Resize { cols: c, rows: r }
        );
    }
    for (s, chunk) in &m.unacked {
        let f = out.pop_front().expect("unacknowledged DATA not resent");
        assert_eq!(
            (f.ty, f.sid, f.seq, f.flags, &f.payload),
            (FrameType::Data, m.session_id, *s, 0, chunk),
            "resent DATA differs"
        );
    }
    let resent = m.unacked.len();
    if !m.reliable {
        m.unacked.clear();
    }
    resent
}

fn drop_acked(m: &mut Model, through: u32) {
    while m.unacked.front().is_some_and(|(s, _)| seq::le(*s, through)) {
        m.unacked.pop_front();
    }
}

/// Goes through the complete frames the server sent since the model last looked, like the
/// contract says the client must: returns the events they call for and checks what the core
/// wrote in answer (`out`, drained as it is matched). `Err(())`: the core must report an error.
fn advance(m: &mut Model, out: &mut VecDeque<Out>) -> (Vec<CoreEvent>, Result<(), ()>) {
    let mut ev = Vec::new();
    while !m.stopped {
        let (fseq, ty, flags, payload, used) = match decode(&m.stream[m.done..], MAX_PAYLOAD) {
            Ok(Decoded::NeedMore(_)) => break,
            Err(_) => {
                m.stopped = true;
                return (ev, Err(()));
            }
            Ok(Decoded::Frame(f, used)) => (f.seq, f.ty, f.flags, f.payload.to_vec(), used),
        };
        m.done += used;
        let fail = |m: &mut Model, ev| {
            m.stopped = true;
            (ev, Err(()))
        };
        match (m.phase, ty) {
            (_, FrameType::Error) => {
                let Ok(e) = ErrorFrame::parse(&payload) else {
                    return fail(m, ev);
                };
                m.stopped = true;
                let rule = after_error(e.code);
                if rule == AfterError::Over {
                    m.phase = Phase::Closed;
                    ev.push(CoreEvent::Ended);
                    break;
                }
                let fatal = match rule {
                    AfterError::Stops => true,
                    AfterError::StopsAfterConnect => m.phase == Phase::Connecting,
                    AfterError::Resumes | AfterError::Over => false,
                };
                m.phase = if fatal { Phase::Closed } else { Phase::Down };
                ev.push(CoreEvent::Error {
                    code: e.code,
                    message: e.message,
                });
            }
            (Phase::Connecting, FrameType::Accept) => {
                let Ok(a) = Accept::parse(&payload) else {
                    return fail(m, ev);
                };
                m.session_id = a.session_id;
                m.token = a.resume_token.unwrap_or([0; 16]);
                m.reliable = a.caps & CAP_RELIABLE != 0;
                ev.push(CoreEvent::Accepted {
                    session_id: a.session_id,
                });
                expect_attach(m, out);
            }
            (Phase::Resuming, FrameType::Resumed) => {
                let Ok(r) = Resumed::parse(&payload) else {
                    return fail(m, ev);
                };
                let l = r.last_client_seq;
                drop_acked(m, l);
                if m.unacked.is_empty() && !seq::gt(m.next, l) {
                    m.next = l.wrapping_add(1).max(1);
                }
                let resent = expect_attach(m, out);
                let gap = flags & FLAG_GAP != 0;
                ev.push(CoreEvent::Resumed { gap, resent });
                if gap {
                    ev.push(CoreEvent::Gap);
                }
            }
            (Phase::Attached, FrameType::Data) => {
                // De-duplication: only what is newer than everything delivered, replay or not.
                if m.highest.is_none_or(|h| seq::gt(fseq, h)) {
                    m.highest = Some(fseq);
                    if !payload.is_empty() {
                        ev.push(CoreEvent::Data(payload));
                    }
                }
            }
            (Phase::Attached, FrameType::Ack) => {
                if let Ok(Ack::Cumulative(s)) = Ack::parse(&payload) {
                    drop_acked(m, s);
                }
            }
            (Phase::Attached, FrameType::Disconnect) => {
                m.phase = Phase::Closed;
                m.stopped = true;
                ev.push(CoreEvent::Ended);
            }
            (Phase::Attached, FrameType::Roam) => {
                let Ok(r) = Roam::parse(&payload) else {
                    return fail(m, ev);
                };
                m.token = r.roam_token;
                m.phase = Phase::Down;
                m.stopped = true;
                ev.push(CoreEvent::Roam(std::net::SocketAddr::new(r.addr, r.port)));
            }
            (Phase::Attached, FrameType::Keepalive | FrameType::Nack | FrameType::Unknown(_)) => {}
            _ => return fail(m, ev),
        }
    }
    (ev, Ok(()))
}

fn events(c: &mut ClientCore) -> Vec<CoreEvent> {
    std::iter::from_fn(|| c.poll_event()).collect()
}

/// Compares what the model and the core say about the session after every call.
fn same_state(m: &Model, c: &ClientCore) {
    assert_eq!(
        c.is_attached(),
        m.phase == Phase::Attached,
        "{m:?}",
        m = m.phase
    );
    assert_eq!(
        c.is_closed(),
        m.phase == Phase::Closed,
        "{m:?}",
        m = m.phase
    );
    assert_eq!(
        c.is_handshaking(),
        matches!(m.phase, Phase::Connecting | Phase::Resuming)
    );
    assert_eq!(c.session_id(), m.session_id);
    assert_eq!(c.resume_token(), m.token);
    assert_eq!(c.next_seq(), m.next);
    assert_eq!(c.last_seq(), m.highest.unwrap_or(0));
    assert_eq!(c.unacked_frames(), m.unacked.len());
    assert_eq!(
        c.unacked_bytes(),
        m.unacked.iter().map(|(_, d)| d.len()).sum::<usize>()
    );
}

/// Feeds `bytes` from the server in one `on_bytes` call and checks everything it did.
fn feed(m: &mut Model, c: &mut ClientCore, bytes: &[u8]) {
    // The session driver reads only while a handshake is under way or the session attached.
    if !matches!(
        m.phase,
        Phase::Connecting | Phase::Resuming | Phase::Attached
    ) {
        return;
    }
    m.stream.extend_from_slice(bytes);
    let res = c.on_bytes(bytes, m.now);
    let mut out: VecDeque<Out> = frames(&c.take_output()).into();
    let (want, ok) = advance(m, &mut out);
    assert_eq!(events(c), want);
    assert_eq!(res.is_ok(), ok.is_ok(), "on_bytes gave {res:?}");
    if res.is_ok() && m.phase == Phase::Attached {
        // One coalesced cumulative ACK for the newest DATA, if it is news.
        if let Some(h) = m.highest {
            if m.acked.is_none_or(|a| seq::gt(h, a)) {
                let f = out.pop_front().expect("no ACK for new DATA");
                fresh(m, &f, FrameType::Ack);
                assert_eq!(Ack::parse(&f.payload).unwrap(), Ack::Cumulative(h));
                m.acked = Some(h);
            }
        }
    }
    // Nothing else: in particular never a KEEPALIVE in answer to what was received.
    assert!(out.is_empty(), "unexpected frames after on_bytes: {out:?}");
    same_state(m, c);
    if res.is_err() || matches!(m.phase, Phase::Down | Phase::Closed) {
        // What the driver does when the connection is over.
        c.connection_lost();
        lost(m);
        assert!(!c.has_output());
        same_state(m, c);
    }
}

fn lost(m: &mut Model) {
    if m.phase != Phase::Closed {
        m.phase = Phase::Down;
    }
    m.stream.clear();
    m.done = 0;
    m.stopped = false;
}

/// A new connection: RESUME if the session exists, else CONNECT.
fn reconnect(m: &mut Model, c: &mut ClientCore, nonce: u8) {
    if m.phase == Phase::Closed {
        return;
    }
    c.connection_lost();
    lost(m);
    let resume = c.has_session();
    assert_eq!(resume, m.session_id != 0);
    if resume {
        c.start_resume(m.now);
    } else {
        c.start_connect([nonce; 16], m.now);
    }
    let out = frames(&c.take_output());
    assert_eq!(out.len(), 1, "{out:?}");
    if resume {
        fresh(m, &out[0], FrameType::Resume);
        assert_eq!(
            Resume::parse(&out[0].payload).unwrap(),
            Resume::Full {
                session_id: m.session_id,
                last_seq: m.highest.unwrap_or(0),
                token: m.token,
            }
        );
        m.phase = Phase::Resuming;
    } else {
        fresh(m, &out[0], FrameType::Connect);
        assert_eq!(out[0].payload.len(), 58);
        m.phase = Phase::Connecting;
    }
    same_state(m, c);
}

/// A server frame built from the input: any type, SEQ near what the client holds or anywhere,
/// any FLAGS, and a payload that is well-formed for its type more often than not.
fn server_frame(i: &mut In, m: &Model) -> Vec<u8> {
    let sel = i.u8();
    let ty = match sel % 16 {
        0..=4 => FrameType::Data,
        5 => FrameType::Ack,
        6 => FrameType::Accept,
        7 => FrameType::Resumed,
        8 => FrameType::Error,
        9 => FrameType::Keepalive,
        10 => FrameType::Disconnect,
        11 => FrameType::Roam,
        12 => FrameType::Nack,
        13 => FrameType::from_code(i.u8()),
        14 => FrameType::Resize,
        _ => FrameType::Suspend,
    };
    let base = m.highest.unwrap_or(0);
    let s = match i.u8() % 4 {
        0 => i.u32(),
        // Around the newest DATA held: replays and new frames.
        _ => base.wrapping_add(i.u8() as i8 as i32 as u32),
    };
    let flags = match i.u8() % 4 {
        0 => i.u8(),
        1 => FLAG_REPLAY,
        _ => 0,
    };
    let raw = i.u8() % 5 == 0;
    let mut p = Vec::new();
    if raw {
        let n = i.u8() as usize;
        p = i.bytes(n);
    } else {
        match ty {
            FrameType::Data => {
                let n = i.u8() as usize % 24;
                p = i.bytes(n);
            }
            FrameType::Ack => match i.u8() % 3 {
                0 => {}
                1 => Ack::Cumulative(m.next.wrapping_sub(i.u8() as u32)).encode(&mut p),
                _ => Ack::Cumulative(i.u32()).encode(&mut p),
            },
            FrameType::Accept => {
                let tok = i.u8();
                Accept {
                    session_id: if i.u8() == 0 { 0 } else { i.u32() | 1 },
                    version: 1,
                    caps: i.u8(),
                    resume_token: (tok % 4 != 0).then_some([tok; 16]),
                }
                .encode(&mut p)
            }
            FrameType::Resumed => Resumed {
                session_id: m.session_id,
                last_client_seq: match i.u8() % 3 {
                    0 => i.u32(),
                    _ => m.next.wrapping_sub(i.u8() as u32),
                },
                first_replay_seq: base.wrapping_add(1),
            }
            .encode(&mut p),
            FrameType::Error => {
                let code = match i.u8() {
                    b @ 0..=200 => (b % 14) as u16,
                    _ => i.u16(),
                };
                p.extend_from_slice(&code.to_be_bytes());
                let n = i.u8() as usize % 8;
                p.extend_from_slice(&i.bytes(n));
            }
            FrameType::Roam => {
                let v6 = i.u8() & 1 == 1;
                let addr = if v6 {
                    std::net::IpAddr::from([i.u8(); 16])
                } else {
                    std::net::IpAddr::from([127, 0, 0, i.u8()])
                };
                Roam {
                    addr,
                    port: i.u16(),
                    roam_token: [i.u8(); 16],
                }
                .encode(&mut p)
            }
            _ => {}
        }
    }
    let mut v = Vec::new();
    encode_to_vec(&mut v, m.session_id, s, ty, flags, &p);
    v
}

fuzz_target!(|data: &[u8]| {
    let mut i = In(data);
    let mode = i.u8();
    let (mut c, mut m);
    let base = Model {
        phase: Phase::Down,
        session_id: 0,
        token: [0; 16],
        reliable: true,
        next: 1,
        highest: None,
        acked: None,
        unacked: VecDeque::new(),
        pending_resize: None,
        stream: Vec::new(),
        done: 0,
        stopped: false,
        now: 0,
    };
    if mode & 1 == 0 {
        c = ClientCore::new(7, 42, [0xAB; 32]);
        m = base;
    } else {
        // Saved credentials: RESUME first.
        let sid = i.u32() | 1;
        let tok = [i.u8(); 16];
        let last = i.u32();
        let next = match mode & 6 {
            0 => i.u32(),
            2 => u32::MAX - 2,
            _ => last.wrapping_add(1),
        };
        c = ClientCore::for_resume(7, 42, sid, tok, last, next);
        m = Model {
            session_id: sid,
            token: tok,
            next: next.max(1),
            highest: (last != 0).then_some(last),
            acked: (last != 0).then_some(last),
            ..base
        };
    }
    c.set_timers(TIMERS);
    same_state(&m, &c);
    reconnect(&mut m, &mut c, mode);

    let mut steps = 0;
    while !i.is_empty() && steps < 256 {
        steps += 1;
        let closed_before = m.phase == Phase::Closed;
        match i.u8() % 12 {
            // Server frames, cut into up to three reads at arbitrary points.
            0..=4 => {
                let n = 1 + i.u8() as usize % 4;
                let mut bytes = Vec::new();
                for _ in 0..n {
                    bytes.extend(server_frame(&mut i, &m));
                }
                let a = i.u8() as usize % (bytes.len() + 1);
                let b = a + i.u8() as usize % (bytes.len() - a + 1);
                for part in [&bytes[..a], &bytes[a..b], &bytes[b..]] {
                    feed(&mut m, &mut c, part);
                }
            }
            // Raw bytes as they are (the seed corpus puts the test vectors' frames here),
            // raw bytes with the last one changed, or a frame with a broken CRC.
            5 => {
                let mode = i.u8() % 3;
                let mut bytes = if mode < 2 {
                    let n = i.u8() as usize;
                    i.bytes(n)
                } else {
                    server_frame(&mut i, &m)
                };
                if mode > 0 {
                    if let Some(last) = bytes.last_mut() {
                        *last ^= 1 | i.u8();
                    }
                }
                feed(&mut m, &mut c, &bytes);
            }
            6 => {
                let n = match i.u8() {
                    b @ 0..=250 => b as usize,
                    b => (b as usize - 250) * MAX_SEND_CHUNK + i.u8() as usize,
                };
                let fill = i.u8();
                let data: Vec<u8> = (0..n).map(|k| fill.wrapping_add(k as u8)).collect();
                c.send_data(&data, m.now);
                let mut out: VecDeque<Out> = frames(&c.take_output()).into();
                if m.phase != Phase::Closed {
                    for chunk in data.chunks(MAX_SEND_CHUNK) {
                        let s = m.next;
                        if m.phase == Phase::Attached {
                            let f = out.pop_front().expect("DATA not sent while attached");
                            fresh(&mut m, &f, FrameType::Data);
                            assert_eq!(f.payload, chunk);
                            if !m.reliable {
                                continue;
                            }
                        } else {
                            m.take_seq();
                        }
                        m.unacked.push_back((s, chunk.to_vec()));
                    }
                }
                assert!(out.is_empty(), "{out:?}");
            }
            7 => {
                let (cols, rows) = (i.u16(), i.u16());
                c.resize(cols, rows, m.now);
                let out = frames(&c.take_output());
                if m.phase == Phase::Attached {
                    assert_eq!(out.len(), 1);
                    fresh(&mut m, &out[0], FrameType::Resize);
                    assert_eq!(
                        Resize::parse(&out[0].payload).unwrap(),
                        Resize { cols, rows }
                    );
                } else {
                    assert!(out.is_empty());
                    m.pending_resize = Some((cols, rows));
                }
            }
            // Timers, at any later time.
            8 => {
                let dt = match i.u8() {
                    b @ 0..=199 => b as u64 * 50,
                    b => (b as u64 - 199) * 1_000_000,
                };
                let next = c.next_timer();
                m.now += dt;
                let alive = c.tick(m.now);
                let out = frames(&c.take_output());
                match next {
                    Some(t) if m.now < t => {
                        assert!(alive, "dead before its deadline");
                        assert!(out.is_empty(), "tick before the deadline sent {out:?}");
                    }
                    _ => {}
                }
                if m.phase == Phase::Attached {
                    // At most one KEEPALIVE, and only once the deadline has come.
                    assert!(out.len() <= 1);
                    if let Some(f) = out.first() {
                        assert!(next.is_some_and(|t| m.now >= t));
                        fresh(&mut m, f, FrameType::Keepalive);
                        assert!(f.payload.is_empty());
                    }
                } else {
                    assert!(out.is_empty());
                }
                same_state(&m, &c);
                if !alive {
                    reconnect(&mut m, &mut c, 1);
                }
            }
            9 => reconnect(&mut m, &mut c, i.u8()),
            10 => {
                c.suspend(m.now);
                let out = frames(&c.take_output());
                if m.phase == Phase::Attached {
                    assert_eq!(out.len(), 1);
                    fresh(&mut m, &out[0], FrameType::Suspend);
                } else {
                    assert!(out.is_empty());
                }
            }
            _ => {
                if i.u8() % 4 == 0 {
                    c.disconnect(m.now);
                    let out = frames(&c.take_output());
                    if m.phase == Phase::Attached {
                        assert_eq!(out.len(), 1);
                        fresh(&mut m, &out[0], FrameType::Disconnect);
                    } else {
                        assert!(out.is_empty());
                    }
                    m.phase = Phase::Closed;
                } else {
                    // Connection lost without a word; the driver reconnects later.
                    c.connection_lost();
                    lost(&mut m);
                }
            }
        }
        same_state(&m, &c);
        assert!(!c.has_output());
        if closed_before {
            // Closed for good: nothing reported, nothing sent, state unchanged.
            assert!(c.is_closed());
            assert_eq!(c.poll_event(), None);
        }
    }
});
