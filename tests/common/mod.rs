//! Black-box harness for the `clawtermd` end-to-end tests.
//!
//! Deliberately independent of the `clawterm` crate: the frame encoder, the strict frame
//! decoder and the CRC-16/UMTS below are written from the protocol text (`docs/PROTOCOL.md`,
//! which agrees with the contract rule for rule), so a bug shared by the server and the crate's
//! codec cannot hide itself.

#![allow(dead_code)]

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

// Not every test binary uses every re-export.
use crate::harness::{
    agent_command, collect_lines, connect_tcp, dump_on_panic, failures_of, plaintext_clawtermd,
    rss_kib, set_client_opts, signal, start_server, stop, tcp_addr, wait_agent_listening, Lines,
};
#[allow(unused_imports)]
pub use crate::harness::{hex, wait_timeout, TempDir};

// ---------------------------------------------------------------------------------------------
// Wire constants (contract §1, §2, §6)

pub const FLAG: u8 = 0x7E;
pub const HEADER: usize = 13;

pub const CONNECT: u8 = 0x01;
pub const ACCEPT: u8 = 0x02;
pub const RESUME: u8 = 0x03;
pub const RESUMED: u8 = 0x04;
pub const DATA: u8 = 0x10;
pub const ACK: u8 = 0x11;
pub const NACK: u8 = 0x12;
pub const RESIZE: u8 = 0x13;
pub const KEEPALIVE: u8 = 0x20;
pub const SUSPEND: u8 = 0x30;
pub const DISCONNECT: u8 = 0x40;
pub const ROAM: u8 = 0x50;
pub const ERROR: u8 = 0xFF;

pub const F_REPLAY: u8 = 0x01;
pub const F_GAP: u8 = 0x02;

pub const E_BAD_FRAME: u16 = 1;
pub const E_UNSUPPORTED_VERSION: u16 = 2;
pub const E_AUTH_FAILED: u16 = 3;
pub const E_NO_SUCH_SESSION: u16 = 4;
pub const E_NO_AGENT: u16 = 5;
pub const E_PROTOCOL_VIOLATION: u16 = 6;
pub const E_TOO_LARGE: u16 = 7;
pub const E_OVERLOADED: u16 = 8;
pub const E_TAKEN_OVER: u16 = 9;
pub const E_BAD_CONNECT: u16 = 12;

/// The tenant/agent the test environments serve, and the tokens in their tokens file.
pub const TENANT: u32 = 7;
pub const AGENT: u32 = 1;
/// An agent id of TENANT that has no pod.
pub const NO_POD_AGENT: u32 = 2;
pub const TOKEN: [u8; 32] = [0xAB; 32];
pub const OTHER_TENANT: u32 = 8;
pub const OTHER_TOKEN: [u8; 32] = [0xCD; 32];
/// A tenant whose only token is good for agent AGENT only (and which has no pods).
pub const RESTRICTED_TENANT: u32 = 9;
pub const RESTRICTED_TOKEN: [u8; 32] = [0x9E; 32];

/// Default bound for every wait on the server.
pub const TIMEOUT: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------------------------
// CRC and frames

/// CRC-16/UMTS, bit by bit: poly 0x8005, init 0, no reflection, xorout 0.
pub fn crc16_umts(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in data {
        crc ^= (b as u16) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x8005
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// A frame header with an arbitrary LEN field (no payload, no CRC): for oversize tests.
pub fn header(sid: u32, seq: u32, typ: u8, flags: u8, len: u16) -> Vec<u8> {
    let mut v = Vec::with_capacity(HEADER);
    v.push(FLAG);
    v.extend_from_slice(&sid.to_be_bytes());
    v.extend_from_slice(&seq.to_be_bytes());
    v.push(typ);
    v.push(flags);
    v.extend_from_slice(&len.to_be_bytes());
    v
}

/// A complete, well-formed frame.
pub fn encode(sid: u32, seq: u32, typ: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
    assert!(payload.len() <= u16::MAX as usize);
    let mut v = header(sid, seq, typ, flags, payload.len() as u16);
    v.extend_from_slice(payload);
    let crc = crc16_umts(&v);
    v.extend_from_slice(&crc.to_be_bytes());
    v
}

/// A decoded frame.
#[derive(Clone, PartialEq, Eq)]
pub struct Frame {
    pub sid: u32,
    pub seq: u32,
    pub typ: u8,
    pub flags: u8,
    pub payload: Vec<u8>,
}

impl std::fmt::Debug for Frame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let p = if self.payload.len() > 48 {
            format!(
                "{:02x?}… ({} bytes)",
                &self.payload[..48],
                self.payload.len()
            )
        } else {
            format!("{:02x?}", self.payload)
        };
        let extra = if self.typ == ERROR && self.payload.len() >= 2 {
            format!(
                " code={} msg={:?}",
                u16::from_be_bytes([self.payload[0], self.payload[1]]),
                String::from_utf8_lossy(&self.payload[2..])
            )
        } else {
            String::new()
        };
        write!(
            f,
            "Frame{{{} sid={:#010x} seq={} flags={:#04x}{} payload={}}}",
            type_name(self.typ),
            self.sid,
            self.seq,
            self.flags,
            extra,
            p
        )
    }
}

pub fn type_name(t: u8) -> String {
    match t {
        CONNECT => "CONNECT".into(),
        ACCEPT => "ACCEPT".into(),
        RESUME => "RESUME".into(),
        RESUMED => "RESUMED".into(),
        DATA => "DATA".into(),
        ACK => "ACK".into(),
        NACK => "NACK".into(),
        RESIZE => "RESIZE".into(),
        KEEPALIVE => "KEEPALIVE".into(),
        SUSPEND => "SUSPEND".into(),
        DISCONNECT => "DISCONNECT".into(),
        ROAM => "ROAM".into(),
        ERROR => "ERROR".into(),
        t => format!("type {t:#04x}"),
    }
}

impl Frame {
    pub fn u32_at(&self, off: usize) -> u32 {
        u32::from_be_bytes(self.payload[off..off + 4].try_into().unwrap())
    }

    /// The code of an ERROR frame.
    pub fn error_code(&self) -> u16 {
        assert_eq!(self.typ, ERROR, "not an ERROR: {self:?}");
        u16::from_be_bytes([self.payload[0], self.payload[1]])
    }
}

/// Strictly decodes one frame from the front of `buf`: `Ok(None)` when more bytes are needed,
/// `Err` when the bytes cannot be a valid frame.
pub fn decode(buf: &[u8]) -> Result<Option<(Frame, usize)>, String> {
    if buf.is_empty() {
        return Ok(None);
    }
    if buf[0] != FLAG {
        return Err(format!("FLAG byte {:#04x}, expected 0x7e", buf[0]));
    }
    if buf.len() < HEADER {
        return Ok(None);
    }
    let len = u16::from_be_bytes([buf[11], buf[12]]) as usize;
    let total = HEADER + len + 2;
    if buf.len() < total {
        return Ok(None);
    }
    let want = crc16_umts(&buf[..HEADER + len]);
    let got = u16::from_be_bytes([buf[HEADER + len], buf[HEADER + len + 1]]);
    if want != got {
        return Err(format!(
            "CRC {got:#06x}, expected {want:#06x}, frame bytes {:02x?}",
            &buf[..total.min(64)]
        ));
    }
    let f = Frame {
        sid: u32::from_be_bytes(buf[1..5].try_into().unwrap()),
        seq: u32::from_be_bytes(buf[5..9].try_into().unwrap()),
        typ: buf[9],
        flags: buf[10],
        payload: buf[HEADER..HEADER + len].to_vec(),
    };
    Ok(Some((f, total)))
}

/// A CONNECT payload (58 bytes).
pub fn connect_payload(
    version: u8,
    caps: u8,
    tenant: u32,
    agent: u32,
    token: &[u8; 32],
) -> Vec<u8> {
    let mut p = vec![version, caps];
    p.extend_from_slice(&tenant.to_be_bytes());
    p.extend_from_slice(&agent.to_be_bytes());
    p.extend_from_slice(token);
    let n = NONCE.fetch_add(1, Ordering::Relaxed);
    let mut nonce = [0x5Au8; 16];
    nonce[..4].copy_from_slice(&n.to_be_bytes());
    p.extend_from_slice(&nonce);
    assert_eq!(p.len(), 58);
    p
}

static NONCE: AtomicU32 = AtomicU32::new(1);

/// A 24-byte RESUME payload.
pub fn resume_payload(sid: u32, last_seq: u32, token: &[u8; 16]) -> Vec<u8> {
    let mut p = sid.to_be_bytes().to_vec();
    p.extend_from_slice(&last_seq.to_be_bytes());
    p.extend_from_slice(token);
    p
}

// ---------------------------------------------------------------------------------------------
// Client

/// What a bounded wait on the connection produced.
#[derive(Debug)]
pub enum Event {
    Frame(Frame),
    Closed,
    Timeout,
}

/// RESUMED, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resumed {
    pub seq: u32,
    pub flags: u8,
    pub last_client_seq: u32,
    pub first_replay_seq: u32,
}

/// A client connection with a strict checker of everything the server sends.
pub struct Client {
    stream: TcpStream,
    buf: Vec<u8>,
    eof: bool,
    /// Session bound to this connection (0 until ACCEPT or RESUMED).
    pub sid: u32,
    /// Last SEQ this client used (continues across connections when the test copies it).
    pub tx_seq: u32,
    /// Next live server SEQ expected (valid once `sid != 0`).
    pub expect_seq: u32,
    /// Highest server SEQ received on this connection (what a RESUME's last_seq reports).
    pub last_seq: u32,
    /// The resume token from ACCEPT.
    pub resume_token: [u8; 16],
    /// Handshake sent on this connection and not answered yet.
    pending_connect: bool,
    pending_resume: Option<(u32, u32)>,
    /// Replay state after RESUMED: frames must be REPLAY DATA with floor < SEQ < ceiling, the
    /// first one equal to `replay_first`.
    in_replay: bool,
    replay_floor: u32,
    replay_ceiling: u32,
    replay_first: u32,
    replay_seen: u32,
    pub timeout: Duration,
    /// Every frame received, in order.
    pub log: Vec<Frame>,
}

impl Client {
    pub fn connect(addr: SocketAddr) -> Client {
        Client::from_stream(connect_tcp(addr, TIMEOUT))
    }

    /// A connection from a given source address (e.g. 127.0.0.2), for per-address limits.
    pub fn connect_from(addr: SocketAddr, src: std::net::Ipv4Addr) -> Client {
        let stream = crate::harness::connect_from(src, addr)
            .unwrap_or_else(|e| panic!("connect from {src} to {addr}: {e}"));
        Client::from_stream(stream)
    }

    /// A client on a connection the test made itself.
    pub fn from_stream(stream: TcpStream) -> Client {
        set_client_opts(&stream, TIMEOUT);
        Client {
            stream,
            buf: Vec::new(),
            eof: false,
            sid: 0,
            tx_seq: 0,
            expect_seq: 0,
            last_seq: 0,
            resume_token: [0; 16],
            pending_connect: false,
            pending_resume: None,
            in_replay: false,
            replay_floor: 0,
            replay_ceiling: 0,
            replay_first: 0,
            replay_seen: 0,
            timeout: TIMEOUT,
            log: Vec::new(),
        }
    }

    pub fn stream(&self) -> &TcpStream {
        &self.stream
    }

    /// Writes bytes as they are.
    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.stream
            .write_all(bytes)
            .unwrap_or_else(|e| panic!("write {} bytes: {e}", bytes.len()));
    }

    /// Writes bytes, tolerating a connection the server already closed.
    pub fn send_raw_lossy(&mut self, bytes: &[u8]) -> bool {
        self.stream.write_all(bytes).is_ok()
    }

    /// Sends a frame with explicit header fields.
    pub fn send_frame(&mut self, sid: u32, seq: u32, typ: u8, flags: u8, payload: &[u8]) {
        let f = encode(sid, seq, typ, flags, payload);
        self.send_raw(&f);
    }

    /// Sends a frame with this connection's session id and the client's next SEQ; returns the SEQ.
    pub fn send(&mut self, typ: u8, payload: &[u8]) -> u32 {
        self.tx_seq = self.tx_seq.wrapping_add(1);
        let seq = self.tx_seq;
        self.send_frame(self.sid, seq, typ, 0, payload);
        seq
    }

    /// The bytes of the frame `send` would write next (consumes a SEQ).
    pub fn next_frame_bytes(&mut self, typ: u8, payload: &[u8]) -> (u32, Vec<u8>) {
        self.tx_seq = self.tx_seq.wrapping_add(1);
        (self.tx_seq, encode(self.sid, self.tx_seq, typ, 0, payload))
    }

    pub fn send_data(&mut self, payload: &[u8]) -> u32 {
        self.send(DATA, payload)
    }

    /// Sends CONNECT (caps 0x01: v1 client, not RELIABLE) without waiting.
    pub fn send_connect(&mut self, tenant: u32, agent: u32, token: &[u8; 32]) {
        let p = connect_payload(1, 0x01, tenant, agent, token);
        self.send_connect_payload(&p);
    }

    pub fn send_connect_payload(&mut self, p: &[u8]) {
        self.pending_connect = true;
        self.tx_seq = self.tx_seq.wrapping_add(1);
        self.send_frame(0, self.tx_seq, CONNECT, 0, p);
    }

    /// Sends a 24-byte RESUME without waiting.
    pub fn send_resume(&mut self, sid: u32, last_seq: u32, token: &[u8; 16]) {
        self.send_resume_payload(sid, last_seq, &resume_payload(sid, last_seq, token));
    }

    /// Sends a RESUME with any payload; `sid`/`last_seq` are what the checker expects back.
    pub fn send_resume_payload(&mut self, sid: u32, last_seq: u32, p: &[u8]) {
        self.pending_resume = Some((sid, last_seq));
        self.tx_seq = self.tx_seq.wrapping_add(1);
        self.send_frame(sid, self.tx_seq, RESUME, 0, p);
    }

    /// CONNECT and expect ACCEPT: returns (session id, resume token).
    pub fn connect_session(
        &mut self,
        tenant: u32,
        agent: u32,
        token: &[u8; 32],
    ) -> (u32, [u8; 16]) {
        match self.try_connect_session(tenant, agent, token) {
            Ok(v) => v,
            Err(code) => panic!("CONNECT refused with ERROR {code}"),
        }
    }

    /// CONNECT; `Err(code)` when refused (the connection is then checked to be closed).
    pub fn try_connect_session(
        &mut self,
        tenant: u32,
        agent: u32,
        token: &[u8; 32],
    ) -> Result<(u32, [u8; 16]), u16> {
        self.send_connect(tenant, agent, token);
        let f = self.recv_frame();
        match f.typ {
            ACCEPT => Ok((self.sid, self.resume_token)),
            ERROR => {
                self.expect_closed();
                Err(f.error_code())
            }
            _ => panic!("expected ACCEPT, got {f:?}"),
        }
    }

    /// RESUME (24 bytes) and expect RESUMED.
    pub fn resume(&mut self, sid: u32, last_seq: u32, token: &[u8; 16]) -> Resumed {
        match self.try_resume(sid, last_seq, token) {
            Ok(r) => r,
            Err(code) => panic!("RESUME of {sid:#010x} refused with ERROR {code}"),
        }
    }

    /// RESUME; `Err(code)` when refused (the connection is then checked to be closed).
    pub fn try_resume(
        &mut self,
        sid: u32,
        last_seq: u32,
        token: &[u8; 16],
    ) -> Result<Resumed, u16> {
        self.send_resume(sid, last_seq, token);
        self.resume_answer()
    }

    /// Waits for the answer to a RESUME already sent.
    pub fn resume_answer(&mut self) -> Result<Resumed, u16> {
        let f = self.recv_frame();
        match f.typ {
            RESUMED => Ok(Resumed {
                seq: f.seq,
                flags: f.flags,
                last_client_seq: f.u32_at(4),
                first_replay_seq: f.u32_at(8),
            }),
            ERROR => {
                self.expect_closed();
                Err(f.error_code())
            }
            _ => panic!("expected RESUMED, got {f:?}"),
        }
    }

    /// The next frame, checked; panics on timeout or EOF.
    pub fn recv_frame(&mut self) -> Frame {
        let t = self.timeout;
        match self.recv_event(t) {
            Event::Frame(f) => f,
            Event::Closed => panic!(
                "connection closed while waiting for a frame (sid {:#010x}, last frames {:?})",
                self.sid,
                self.log.iter().rev().take(3).collect::<Vec<_>>()
            ),
            Event::Timeout => panic!(
                "no frame within {t:?} (sid {:#010x}, last frames {:?})",
                self.sid,
                self.log.iter().rev().take(3).collect::<Vec<_>>()
            ),
        }
    }

    /// The next frame that is not a KEEPALIVE or ACK.
    pub fn recv_skip_idle(&mut self) -> Frame {
        loop {
            let f = self.recv_frame();
            if f.typ != KEEPALIVE && f.typ != ACK {
                return f;
            }
        }
    }

    /// The next DATA frame (skipping KEEPALIVE/ACK); panics on anything else.
    pub fn recv_data(&mut self) -> Frame {
        let f = self.recv_skip_idle();
        assert_eq!(f.typ, DATA, "expected DATA, got {f:?}");
        f
    }

    /// Sends DATA and expects the same bytes back as one live DATA frame; returns its SEQ.
    pub fn echo(&mut self, payload: &[u8]) -> u32 {
        self.send_data(payload);
        let f = self.recv_data();
        assert_eq!(f.flags, 0, "live echo with flags: {f:?}");
        assert_eq!(f.payload, payload, "echo payload differs");
        f.seq
    }

    /// Expects an ERROR with `code`, then the connection closed.
    pub fn expect_error(&mut self, code: u16) -> Frame {
        let f = self.recv_frame();
        assert_eq!(f.typ, ERROR, "expected ERROR {code}, got {f:?}");
        assert_eq!(f.error_code(), code, "wrong ERROR code: {f:?}");
        self.expect_closed();
        f
    }

    /// Expects EOF (or a reset) within the timeout, with no frame before it.
    pub fn expect_closed(&mut self) {
        let t = self.timeout;
        self.expect_closed_within(t);
    }

    /// Expects EOF (or a reset) within `t`, whatever frames come first (e.g. what a stopping
    /// server says on the way out).
    pub fn expect_closed_after_any(&mut self, t: Duration) {
        let deadline = Instant::now() + t;
        loop {
            match self.recv_event(Duration::from_millis(100)) {
                Event::Closed => break,
                Event::Frame(_) => {}
                Event::Timeout => assert!(
                    Instant::now() < deadline,
                    "connection open after the server exited"
                ),
            }
        }
    }

    pub fn expect_closed_within(&mut self, t: Duration) {
        match self.recv_event(t) {
            Event::Closed => {}
            Event::Frame(f) => panic!("expected the connection closed, got {f:?}"),
            Event::Timeout => panic!("connection still open after {t:?}"),
        }
    }

    /// Expects nothing at all (no frame, no EOF) for `t`.
    pub fn expect_silence(&mut self, t: Duration) {
        match self.recv_event(t) {
            Event::Timeout => {}
            Event::Frame(f) => panic!("expected silence for {t:?}, got {f:?}"),
            Event::Closed => panic!("expected silence for {t:?}, the connection closed"),
        }
    }

    /// Waits up to `t` for the next frame, EOF, or nothing.
    pub fn recv_event(&mut self, t: Duration) -> Event {
        let deadline = Instant::now() + t;
        loop {
            match decode(&self.buf) {
                Ok(Some((f, n))) => {
                    self.buf.drain(..n);
                    self.check(&f);
                    self.log.push(f.clone());
                    return Event::Frame(f);
                }
                Ok(None) => {}
                Err(e) => panic!("server sent a broken frame: {e}"),
            }
            if self.eof {
                assert!(
                    self.buf.is_empty(),
                    "connection closed in the middle of a frame: {:02x?}",
                    self.buf
                );
                return Event::Closed;
            }
            let now = Instant::now();
            if now >= deadline {
                return Event::Timeout;
            }
            let wait = (deadline - now).max(Duration::from_millis(1));
            self.stream.set_read_timeout(Some(wait)).unwrap();
            let mut tmp = [0u8; 65536];
            match self.stream.read(&mut tmp) {
                Ok(0) => self.eof = true,
                Ok(n) => self.buf.extend_from_slice(&tmp[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::ConnectionReset
                            | ErrorKind::ConnectionAborted
                            | ErrorKind::BrokenPipe
                    ) =>
                {
                    self.eof = true
                }
                Err(e) => panic!("read: {e}"),
            }
        }
    }

    /// The strict checks on every frame the server sends.
    fn check(&mut self, f: &Frame) {
        assert_eq!(
            f.flags & !(F_REPLAY | F_GAP),
            0,
            "unknown FLAGS bits from the server: {f:?}"
        );
        if f.flags & F_GAP != 0 {
            assert_eq!(f.typ, RESUMED, "GAP on a frame that is not RESUMED: {f:?}");
        }
        if self.sid == 0 {
            // No session on this connection yet.
            match f.typ {
                ACCEPT => {
                    assert!(self.pending_connect, "ACCEPT without a CONNECT: {f:?}");
                    assert_eq!(f.seq, 1, "ACCEPT must carry SEQ 1: {f:?}");
                    assert_eq!(f.flags, 0, "flags on ACCEPT: {f:?}");
                    assert_ne!(f.sid, 0, "ACCEPT with session id 0: {f:?}");
                    assert_eq!(
                        f.payload.len(),
                        22,
                        "ACCEPT payload must be 22 bytes: {f:?}"
                    );
                    assert_eq!(
                        f.u32_at(0),
                        f.sid,
                        "ACCEPT payload session id differs from header: {f:?}"
                    );
                    assert_eq!(f.payload[4], 1, "ACCEPT server version: {f:?}");
                    self.pending_connect = false;
                    self.sid = f.sid;
                    self.expect_seq = 2;
                    self.last_seq = 1;
                    self.resume_token.copy_from_slice(&f.payload[6..22]);
                }
                RESUMED => {
                    let (sid, last) = self
                        .pending_resume
                        .unwrap_or_else(|| panic!("RESUMED without a RESUME: {f:?}"));
                    assert_eq!(f.sid, sid, "RESUMED header session id: {f:?}");
                    assert_eq!(
                        f.payload.len(),
                        12,
                        "RESUMED payload must be 12 bytes: {f:?}"
                    );
                    assert_eq!(f.u32_at(0), sid, "RESUMED payload session id: {f:?}");
                    assert_eq!(f.flags & F_REPLAY, 0, "REPLAY on RESUMED: {f:?}");
                    assert!(
                        f.seq > last,
                        "RESUMED SEQ {} not above the client's last_seq {last}: {f:?}",
                        f.seq
                    );
                    let first = f.u32_at(8);
                    if first != 0 {
                        assert!(
                            first > last && first < f.seq,
                            "first_replay_seq {first} outside ({last}, {}): {f:?}",
                            f.seq
                        );
                    }
                    self.pending_resume = None;
                    self.sid = sid;
                    self.expect_seq = f.seq.wrapping_add(1);
                    self.last_seq = f.seq;
                    self.in_replay = true;
                    self.replay_floor = last;
                    self.replay_ceiling = f.seq;
                    self.replay_first = first;
                    self.replay_seen = 0;
                }
                ERROR => {
                    assert_eq!(
                        (f.sid, f.seq),
                        (0, 0),
                        "an ERROR on a connection with no session must carry SESSION_ID 0 and SEQ 0: {f:?}"
                    );
                    self.check_error_payload(f);
                }
                _ => panic!("unexpected frame on a connection with no session: {f:?}"),
            }
            return;
        }
        assert_eq!(
            f.sid, self.sid,
            "SESSION_ID {:#010x} differs from the session's {:#010x}: {f:?}",
            f.sid, self.sid
        );
        if f.flags & F_REPLAY != 0 {
            assert_eq!(f.typ, DATA, "REPLAY on a frame that is not DATA: {f:?}");
            assert!(
                self.in_replay,
                "REPLAY frame after live traffic started: {f:?}"
            );
            if self.replay_seen == 0 {
                assert_eq!(
                    f.seq, self.replay_first,
                    "first replayed frame's SEQ differs from RESUMED first_replay_seq: {f:?}"
                );
            }
            assert!(
                f.seq > self.replay_floor && f.seq < self.replay_ceiling,
                "replayed SEQ {} not in ({}, {}) (out of order, duplicated, or not a past frame): {f:?}",
                f.seq,
                self.replay_floor,
                self.replay_ceiling
            );
            self.replay_floor = f.seq;
            self.replay_seen += 1;
            return;
        }
        if self.in_replay {
            assert!(
                self.replay_first == 0 || self.replay_seen > 0,
                "RESUMED announced first_replay_seq {} but live traffic came first: {f:?}",
                self.replay_first
            );
            self.in_replay = false;
        }
        assert_eq!(
            f.seq, self.expect_seq,
            "server SEQ {} is not the next expected {}: {f:?}",
            f.seq, self.expect_seq
        );
        self.expect_seq = self.expect_seq.wrapping_add(1);
        self.last_seq = f.seq;
        match f.typ {
            DATA | KEEPALIVE | DISCONNECT | ROAM => {}
            ACK => assert_eq!(f.payload.len(), 4, "server ACK payload: {f:?}"),
            ERROR => self.check_error_payload(f),
            _ => panic!("unexpected frame type on an attached session: {f:?}"),
        }
        if f.typ == KEEPALIVE {
            assert!(f.payload.is_empty(), "KEEPALIVE with a payload: {f:?}");
        }
    }

    fn check_error_payload(&self, f: &Frame) {
        assert!(
            f.payload.len() >= 2,
            "ERROR payload shorter than 2 bytes: {f:?}"
        );
        assert!(
            std::str::from_utf8(&f.payload[2..]).is_ok(),
            "ERROR message is not UTF-8: {f:?}"
        );
    }

    /// Takes the connection out (e.g. to reset it with `harness::reset`).
    pub fn into_stream(self) -> TcpStream {
        self.stream
    }

    /// Closes the socket abruptly (no SUSPEND).
    pub fn drop_abruptly(self) {
        let _ = self.stream.shutdown(Shutdown::Both);
    }
}

// ---------------------------------------------------------------------------------------------
// Processes and directories

/// A `claw-agent ... echo` process.
pub struct AgentProc {
    child: Child,
    pub socket: PathBuf,
    lines: Lines,
}

impl AgentProc {
    pub fn start(socket_dir: &Path, tenant: u32, agent: u32) -> AgentProc {
        AgentProc::start_with(socket_dir, tenant, agent, &["echo"])
    }

    /// `claw-agent -s DIR --tenant T --agent A ARGS...` (e.g. `exec -- CMD`).
    pub fn start_with(socket_dir: &Path, tenant: u32, agent: u32, args: &[&str]) -> AgentProc {
        let socket = socket_dir.join(format!("{tenant}_{agent}"));
        let mut child = agent_command(socket_dir, tenant, agent, args)
            .env("RUST_LOG", "debug")
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn claw-agent");
        let lines = collect_lines(child.stderr.take().unwrap(), |_| {});
        let mut a = AgentProc {
            child,
            socket,
            lines,
        };
        // The socket file appears at bind(), before listen(): wait for the agent's own
        // "listening" line on stdout, then for the file.
        wait_agent_listening(&mut a.child);
        assert!(
            a.socket.exists(),
            "claw-agent listening but {} missing",
            a.socket.display()
        );
        a
    }
}

impl AgentProc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        stop(&mut self.child);
        dump_on_panic(
            &format!("claw-agent {}", self.socket.display()),
            &self.lines,
        );
    }
}

/// One server configuration the tests run under.
#[derive(Clone, Copy, Debug)]
pub struct Cfg {
    pub io: &'static str,
    pub shards: usize,
}

pub const CONFIGS: [Cfg; 4] = [
    Cfg {
        io: "epoll",
        shards: 1,
    },
    Cfg {
        io: "epoll",
        shards: 2,
    },
    Cfg {
        io: "uring",
        shards: 1,
    },
    Cfg {
        io: "uring",
        shards: 2,
    },
];

/// A running `clawtermd`.
pub struct ServerProc {
    child: Child,
    pub addr: SocketAddr,
    /// The WebSocket port, when on.
    pub ws: Option<SocketAddr>,
    lines: Lines,
}

impl ServerProc {
    pub fn start(
        cfg: Cfg,
        tokens: &Path,
        socket_dir: &Path,
        extra: &[&str],
        debug_log: bool,
    ) -> ServerProc {
        let mut cmd = plaintext_clawtermd(tokens, socket_dir);
        cmd.args(["--shards", &cfg.shards.to_string(), "--io", cfg.io])
            .args(["--admin", "off", "--no-quic"])
            .args(extra)
            .env_remove("NO_COLOR");
        cmd.env(
            "RUST_LOG",
            if debug_log {
                "clawterm=debug,clawtermd=debug"
            } else {
                "info"
            },
        );
        let (child, lines, line) =
            start_server(&mut cmd, &format!("clawtermd ({cfg:?} {extra:?})"));
        let addr = tcp_addr(&line).unwrap_or_else(|| panic!("bad listen line {line:?}"));
        let ws = crate::harness::ws_addr(&line);
        ServerProc {
            child,
            addr,
            ws,
            lines,
        }
    }

    /// The stderr lines so far.
    pub fn log_lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    pub fn log_contains(&self, s: &str) -> bool {
        self.lines.lock().unwrap().iter().any(|l| l.contains(s))
    }

    /// SIGTERM and wait up to `t` for the exit.
    pub fn terminate(&mut self, t: Duration) -> Option<ExitStatus> {
        self.signal_and_wait(libc::SIGTERM, t)
    }

    /// Sends `sig` and waits up to `t` for the exit.
    pub fn signal_and_wait(&mut self, sig: libc::c_int, t: Duration) -> Option<ExitStatus> {
        signal(self.child.id(), sig);
        wait_timeout(&mut self.child, t)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident memory of the server process, in KiB.
    pub fn rss_kib(&self) -> u64 {
        rss_kib(self.child.id()).unwrap_or(0)
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for ServerProc {
    fn drop(&mut self) {
        stop(&mut self.child);
        dump_on_panic("clawtermd", &self.lines);
    }
}

/// A temp dir with a tokens file and a socket dir, one echo agent (TENANT/AGENT) and a server.
/// Fields drop in order: server, agent, directory.
pub struct Env {
    pub server: ServerProc,
    pub agent: AgentProc,
    pub dir: TempDir,
    pub cfg: Cfg,
}

impl Env {
    pub fn start(cfg: Cfg, extra: &[&str]) -> Env {
        Env::start_opts(cfg, extra, false)
    }

    pub fn start_opts(cfg: Cfg, extra: &[&str], debug_log: bool) -> Env {
        let dir = TempDir::with_sock(&format!("{}{}", cfg.io, cfg.shards));
        let sock = dir.sock();
        let tokens = dir.0.join("tokens");
        std::fs::write(
            &tokens,
            format!(
                "# e2e tokens\n{TENANT} {}\n\n  {OTHER_TENANT}\t{}  \n{RESTRICTED_TENANT} {} {AGENT}\n",
                hex(&TOKEN),
                hex(&OTHER_TOKEN),
                hex(&RESTRICTED_TOKEN)
            ),
        )
        .unwrap();
        let agent = AgentProc::start(&sock, TENANT, AGENT);
        let server = ServerProc::start(cfg, &tokens, &sock, extra, debug_log);
        Env {
            server,
            agent,
            dir,
            cfg,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.server.addr
    }

    pub fn socket_dir(&self) -> PathBuf {
        self.dir.0.join("sock")
    }

    /// Another agent pod of TENANT (drop it before the Env).
    pub fn extra_agent(&self, agent: u32, args: &[&str]) -> AgentProc {
        let a = AgentProc::start_with(&self.socket_dir(), TENANT, agent, args);
        // POD-LINK.md §1: a new socket file becomes usable within 100 ms.
        std::thread::sleep(Duration::from_millis(150));
        a
    }

    pub fn client(&self) -> Client {
        Client::connect(self.server.addr)
    }

    /// A new connection with a new session (TENANT/AGENT).
    pub fn session(&self) -> Client {
        let mut c = self.client();
        c.connect_session(TENANT, AGENT, &TOKEN);
        c
    }
}

/// Runs `f` for every configuration, all of them even when one fails, and fails with every
/// failure's message.
pub fn for_each_config(f: impl Fn(Cfg)) {
    let failures = failures_of(&CONFIGS, |c| format!("io={} shards={}", c.io, c.shards), f);
    if !failures.is_empty() {
        panic!(
            "{} of 4 configurations failed:\n{}",
            failures.len(),
            failures.join("\n")
        );
    }
}

/// A small deterministic PRNG (xorshift64*).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next_u64() as u8).collect()
    }
}

#[test]
fn crc_check_value() {
    assert_eq!(crc16_umts(b"123456789"), 0xFEE8);
    // The contract's vector `keepalive_s1_q1`.
    assert_eq!(
        hex(&encode(1, 1, KEEPALIVE, 0, &[])),
        "7e0000000100000001200000001369"
    );
    let (f, n) = decode(&encode(9, 3, DATA, F_REPLAY, b"xyz"))
        .unwrap()
        .unwrap();
    assert_eq!(n, 18);
    assert_eq!(
        (f.sid, f.seq, f.typ, f.flags, &f.payload[..]),
        (9, 3, DATA, F_REPLAY, &b"xyz"[..])
    );
    let mut bad = encode(9, 3, DATA, 0, b"xyz");
    bad[14] ^= 1;
    assert!(decode(&bad).is_err());
}
