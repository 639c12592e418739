//! The per-core handler: connections, sessions, pod links and timers of one shard.
//!
//! The reactor (`shards`) moves bytes and events; this handler decodes frames, asks the sans-IO
//! session core what to do, and routes what it writes: client frames to the session's
//! connection, pod messages to the shard's link for the session's pod. Sessions are entries of
//! the shard's [`SessionTable`]; no task exists per session or per connection.

use super::limits::Limiter;
use super::metrics::{self, ShardMetrics};
use super::Shared;
use crate::podlink::{self, CloseReason, Msg as PodMsg};
use crate::pods::links::{self as pods, Links};
use crate::proto::{
    self, handshake::Early, payload::ErrorFrame, Connect, Decoded, ErrorCode, Frame, FrameType,
    Resume, CAP_RELIABLE, CAP_ROAM,
};
use crate::session::table::IdMap;
use crate::session::{Clock, Flow, IdSpace, ResumeFrom, Session, SessionTable, Sink, State};
use shards::timer::Wheel;
use shards::{ConnId, Ctx};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;
use tracing::{debug, info, warn};

/// Messages between shards.
pub enum ShardMsg {
    /// A connection handed over to the shard that owns the session it wants to resume;
    /// `buffered` holds the RESUME frame and anything received after it.
    Resume {
        buffered: Vec<u8>,
        /// When the connection was accepted (for the resume latency histogram).
        accepted_at: Instant,
        /// The connection's TLS state, which moves with it.
        tls: Option<Box<rustls::ServerConnection>>,
    },
    /// The pod registry saw a pod socket appear.
    PodAdded(u32, u32),
    /// The pod registry saw a pod socket disappear.
    PodRemoved(u32, u32),
}

/// Where a session's effects are collected before they are sent.
#[derive(Default)]
struct Scratch {
    client: Vec<u8>,
    pod: Vec<u8>,
}

impl Sink for Scratch {
    fn client(&mut self) -> &mut Vec<u8> {
        &mut self.client
    }
    fn pod(&mut self, session_id: u32, msg: PodMsg<'_>) {
        podlink::encode(&mut self.pod, session_id, &msg);
    }
}

#[derive(Copy, Clone, PartialEq, Eq, Debug)]
enum ConnState {
    /// Waiting for CONNECT or RESUME.
    Handshake,
    /// Bound to a session.
    Bound(u32),
}

struct Conn {
    state: ConnState,
    /// A partial frame (allocated only while one is pending).
    inbuf: Vec<u8>,
    peer: SocketAddr,
    /// Accepted at, in µs on this shard's clock (handshake and resume latency).
    accepted_us: u64,
    /// Handed over from another shard (a cross-shard resume).
    adopted: bool,
    /// TLS state (None on a plaintext port).
    tls: Option<Box<rustls::ServerConnection>>,
}

#[derive(Copy, Clone, Debug)]
enum Key {
    Session(u32),
    Handshake(ConnId),
    /// The agent grace period of a lost pod.
    Grace((u32, u32)),
    /// Retry connecting to a lost pod whose socket is still registered.
    Retry((u32, u32)),
    /// Refresh the gauges in the metrics.
    Stats,
}

const STATS_EVERY_MS: u64 = 1000;

/// One shard's state.
pub struct ShardHandler {
    index: usize,
    shared: Arc<Shared>,
    clock: Clock,
    table: SessionTable,
    conns: IdMap<ConnId, Conn>,
    /// The connection each attached session is bound to.
    attached: IdMap<u32, ConnId>,
    links: Links,
    wheel: Wheel<Key>,
    fired: Vec<(u64, Key)>,
    next_wake: u64,
    pending_handshakes: usize,
    scratch: Scratch,
    /// Decrypted bytes of the TLS connection being read (reused).
    plain: Vec<u8>,
    /// TLS records being written (reused).
    tls_out: Vec<u8>,
    /// Per-source-address limits.
    limiter: Limiter,
}

const NO_WAKE: u64 = u64::MAX;

impl ShardHandler {
    pub fn new(index: usize, shared: Arc<Shared>) -> ShardHandler {
        let clock = Clock::new(Instant::now());
        let limiter = Limiter::new(
            shared.cfg.conn_rate_per_ip,
            shared.cfg.max_auth_failures_per_ip,
        );
        ShardHandler {
            index,
            table: SessionTable::new(IdSpace::new(index, shared.cfg.shards)),
            shared,
            clock,
            conns: IdMap::default(),
            attached: IdMap::default(),
            links: Links::default(),
            wheel: Wheel::new(0),
            fired: Vec::new(),
            next_wake: NO_WAKE,
            pending_handshakes: 0,
            scratch: Scratch::default(),
            plain: Vec::new(),
            tls_out: Vec::new(),
            limiter,
        }
    }

    /// Notes a failed authentication (AUTH_FAILED, NO_SUCH_SESSION) of `conn`'s address.
    fn auth_failed(&mut self, ctx: &Ctx<'_, ShardMsg>, conn: ConnId) {
        if let Some(c) = self.conns.get(&conn) {
            let now = self.clock.ms(ctx.now());
            self.limiter.auth_failed(c.peer.ip(), now);
        }
    }

    fn m(&self) -> &ShardMetrics {
        &self.shared.metrics.shards[self.index]
    }

    /// Sends client bytes, counting frames, bytes and ERROR codes.
    fn send_client(&mut self, ctx: &mut Ctx<'_, ShardMsg>, conn: ConnId, bytes: &[u8]) {
        let m = &self.shared.metrics.shards[self.index];
        let frames = metrics::count_frames(bytes, |code| m.error(code));
        ShardMetrics::inc(&m.frames_out, frames);
        ShardMetrics::inc(&m.bytes_out, bytes.len() as u64);
        match self.conns.get_mut(&conn).and_then(|c| c.tls.as_mut()) {
            Some(tls) => {
                use std::io::Write;
                // The plaintext buffer is unbounded by default; this cannot fail.
                let _ = tls.writer().write_all(bytes);
                self.tls_flush(ctx, conn);
            }
            None => {
                ctx.send(conn, bytes);
            }
        }
    }

    /// Sends whatever TLS records the connection has pending (handshake, alerts, data).
    fn tls_flush(&mut self, ctx: &mut Ctx<'_, ShardMsg>, conn: ConnId) {
        let Some(tls) = self.conns.get_mut(&conn).and_then(|c| c.tls.as_mut()) else {
            return;
        };
        let mut out = std::mem::take(&mut self.tls_out);
        out.clear();
        while tls.wants_write() {
            if tls.write_tls(&mut out).is_err() {
                break;
            }
        }
        if !out.is_empty() {
            ctx.send(conn, &out);
        }
        self.tls_out = out;
    }

    /// Ciphertext from a TLS connection: decrypt it all, then process the plaintext.
    fn on_tls_data(&mut self, ctx: &mut Ctx<'_, ShardMsg>, conn: ConnId, data: &[u8]) {
        let mut plain = std::mem::take(&mut self.plain);
        plain.clear();
        let mut rd = data;
        let mut failed = None;
        if let Some(tls) = self.conns.get_mut(&conn).and_then(|c| c.tls.as_mut()) {
            while !rd.is_empty() {
                match tls.read_tls(&mut rd) {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e) => {
                        failed = Some(e.to_string());
                        break;
                    }
                }
                match tls.process_new_packets() {
                    Ok(st) => {
                        let n = st.plaintext_bytes_to_read();
                        if n > 0 {
                            use std::io::Read;
                            let at = plain.len();
                            plain.resize(at + n, 0);
                            if tls.reader().read_exact(&mut plain[at..]).is_err() {
                                plain.truncate(at);
                            }
                        }
                    }
                    Err(e) => {
                        failed = Some(e.to_string());
                        break;
                    }
                }
            }
        }
        // Handshake messages, or the alert that explains a failure.
        self.tls_flush(ctx, conn);
        if let Some(e) = failed {
            debug!(shard = self.index, ?conn, error = %e, "TLS failure; closing");
            self.conn_lost(ctx, conn, true);
        } else if !plain.is_empty() {
            self.on_plaintext(ctx, conn, &plain);
        }
        self.plain = plain;
    }

    /// Plaintext bytes from a client: frames are decoded straight from them when no partial
    /// frame is pending (no copy); a trailing partial frame is kept in the connection's buffer.
    fn on_plaintext(&mut self, ctx: &mut Ctx<'_, ShardMsg>, conn: ConnId, data: &[u8]) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        if c.inbuf.is_empty() {
            // Fast path: decode straight from the receive buffer.
            let (used, alive) = self.process(ctx, conn, data);
            if alive && used < data.len() {
                if let Some(c) = self.conns.get_mut(&conn) {
                    c.inbuf.extend_from_slice(&data[used..]);
                }
            }
        } else {
            let mut buf = std::mem::take(&mut c.inbuf);
            buf.extend_from_slice(data);
            let (used, alive) = self.process(ctx, conn, &buf);
            if alive {
                if let Some(c) = self.conns.get_mut(&conn) {
                    if used < buf.len() {
                        buf.drain(..used);
                        c.inbuf = buf;
                    }
                }
            }
        }
    }

    /// The connection is gone or must go: a bound session is suspended.
    fn conn_lost(&mut self, ctx: &mut Ctx<'_, ShardMsg>, conn: ConnId, close: bool) {
        let Some(c) = self.conns.get(&conn) else {
            return;
        };
        if let ConnState::Bound(sid) = c.state {
            if self.attached.get(&sid) == Some(&conn) {
                let now = self.now(ctx);
                if let Some(s) = self.table.get_mut(sid) {
                    s.detach(now, &mut self.scratch);
                    let key = (s.tenant(), s.agent());
                    self.flush(ctx, None, key);
                }
                self.drop_conn(ctx, conn, close);
                self.arm(ctx, sid);
                debug!(
                    shard = self.index,
                    session = sid,
                    "connection lost; session suspended"
                );
                return;
            }
        }
        self.drop_conn(ctx, conn, close);
    }

    fn publish_gauges(&self) {
        let m = self.m();
        let attached = self.attached.len() as u64;
        ShardMetrics::set(&m.sessions_attached, attached);
        ShardMetrics::set(
            &m.sessions_suspended,
            (self.table.len() as u64).saturating_sub(attached),
        );
        ShardMetrics::set(&m.connections, self.conns.len() as u64);
        ShardMetrics::set(&m.pod_links, self.links.connected() as u64);
        let ring: u64 = self
            .table
            .ids_iter()
            .filter_map(|id| self.table.get(id))
            .map(|s| s.ring().payload_bytes() as u64)
            .sum();
        ShardMetrics::set(&m.ring_bytes, ring);
    }

    fn now(&self, ctx: &Ctx<'_, ShardMsg>) -> u64 {
        self.clock.ms(ctx.now())
    }

    fn schedule(&mut self, ctx: &mut Ctx<'_, ShardMsg>, deadline: u64) {
        if deadline < self.next_wake {
            self.next_wake = deadline;
            ctx.wake_at(self.clock.instant(deadline));
        }
    }

    /// Files the session's next timer if it is earlier than the one already filed.
    fn arm(&mut self, ctx: &mut Ctx<'_, ShardMsg>, sid: u32) {
        let cfg = &self.shared.cfg.session;
        let Some(s) = self.table.get_mut(sid) else {
            return;
        };
        let Some(d) = s.next_deadline(cfg) else {
            return;
        };
        if s.armed == 0 || d < s.armed {
            s.armed = d;
            self.wheel.insert(d, Key::Session(sid));
            self.schedule(ctx, d);
        }
    }

    /// Sends what the scratch sink collected: client bytes to `conn`, pod bytes to the link of
    /// `pod`.
    fn flush(&mut self, ctx: &mut Ctx<'_, ShardMsg>, conn: Option<ConnId>, pod: (u32, u32)) {
        if !self.scratch.client.is_empty() {
            let mut bytes = std::mem::take(&mut self.scratch.client);
            if let Some(c) = conn {
                self.send_client(ctx, c, &bytes);
            }
            bytes.clear();
            self.scratch.client = bytes;
        }
        if !self.scratch.pod.is_empty() {
            let bytes = std::mem::take(&mut self.scratch.pod);
            self.link_send(ctx, pod, &bytes);
            self.scratch.pod = bytes;
            self.scratch.pod.clear();
        }
    }

    fn link_send(&mut self, ctx: &mut Ctx<'_, ShardMsg>, key: (u32, u32), bytes: &[u8]) {
        match self.links.get_mut(key) {
            Some(l) if l.connected => {
                ctx.send(l.conn, bytes);
            }
            Some(l) => l.pending.extend_from_slice(bytes),
            None => debug!(shard = self.index, ?key, "no link for pod message; dropped"),
        }
    }

    /// The link to (tenant, agent), opened if this shard has none yet.
    fn ensure_link(&mut self, ctx: &mut Ctx<'_, ShardMsg>, key: (u32, u32)) -> bool {
        if let Some(l) = self.links.get(key) {
            // A lost pod takes no new sessions until it is back.
            return l.lost_since.is_none();
        }
        let path = pods::socket_path(&self.shared.cfg.socket_dir, key.0, key.1);
        match ctx.connect_unix(&path) {
            Ok(conn) => {
                let name = format!("clawtermd shard {}", self.index);
                self.links.insert(key, conn, &name);
                true
            }
            Err(e) => {
                warn!(shard = self.index, path = %path.display(), error = %e, "cannot connect to agent pod");
                false
            }
        }
    }

    /// Refuses a connection that has no session: ERROR with SESSION_ID 0 and SEQ 0, then close.
    fn refuse(&mut self, ctx: &mut Ctx<'_, ShardMsg>, conn: ConnId, code: ErrorCode) {
        let mut out = Vec::with_capacity(64);
        proto::frame::encode_with(&mut out, 0, 0, FrameType::Error, 0, |o| {
            ErrorFrame::encode_parts(code, code.message(), o)
        });
        self.send_client(ctx, conn, &out);
        self.drop_conn(ctx, conn, true);
        debug!(shard = self.index, ?conn, %code, "connection refused");
    }

    /// Forgets a connection (and closes it, flushing, when `close`).
    fn drop_conn(&mut self, ctx: &mut Ctx<'_, ShardMsg>, conn: ConnId, close: bool) {
        if let Some(c) = self.conns.remove(&conn) {
            match c.state {
                ConnState::Handshake => self.pending_handshakes -= 1,
                ConnState::Bound(sid) => {
                    if self.attached.get(&sid) == Some(&conn) {
                        self.attached.remove(&sid);
                    }
                }
            }
        }
        if close {
            ctx.close(conn);
        }
    }

    /// Applies a session's [`Flow`] to its connection and the table.
    fn apply_flow(
        &mut self,
        ctx: &mut Ctx<'_, ShardMsg>,
        sid: u32,
        conn: Option<ConnId>,
        flow: Flow,
    ) {
        match flow {
            Flow::Continue => self.arm(ctx, sid),
            Flow::Suspend => {
                if let Some(c) = conn {
                    self.drop_conn(ctx, c, true);
                }
                self.attached.remove(&sid);
                self.arm(ctx, sid);
            }
            Flow::Close => {
                if let Some(c) = conn {
                    self.drop_conn(ctx, c, true);
                }
                self.attached.remove(&sid);
                self.remove_session(sid);
            }
        }
    }

    fn remove_session(&mut self, sid: u32) {
        if let Some(s) = self.table.remove(sid) {
            self.shared.release_session();
            if let Some(l) = self.links.get_mut((s.tenant(), s.agent())) {
                l.sessions.remove(&sid);
            }
        }
    }

    /// Feeds received bytes through the frame decoder. Returns how many bytes were consumed
    /// and whether the connection is still ours to read.
    fn process(
        &mut self,
        ctx: &mut Ctx<'_, ShardMsg>,
        conn: ConnId,
        bytes: &[u8],
    ) -> (usize, bool) {
        let mut off = 0;
        let mut alive = true;
        let max = self.shared.cfg.session.max_payload;
        while off < bytes.len() {
            if self
                .conns
                .get(&conn)
                .is_some_and(|c| c.state == ConnState::Handshake)
            {
                // Before the handshake, anything but a CONNECT or RESUME of an acceptable size
                // is answered from its header: an unauthenticated peer cannot make the server
                // buffer more than one CONNECT.
                match proto::handshake::check(&bytes[off..], max) {
                    Early::Decode => {}
                    Early::NeedMore(_) => break,
                    Early::Refuse(code) => {
                        debug!(shard = self.index, ?conn, %code, "handshake frame refused from its header");
                        self.refuse(ctx, conn, code);
                        alive = false;
                        break;
                    }
                }
            }
            match proto::decode(&bytes[off..], max) {
                Err(e) => {
                    debug!(shard = self.index, ?conn, error = %e, "broken stream");
                    self.broken(ctx, conn, e.error_code());
                    alive = false;
                    break;
                }
                Ok(Decoded::NeedMore(_)) => break,
                Ok(Decoded::Frame(f, used)) => {
                    ShardMetrics::inc(&self.m().frames_in, 1);
                    let rest_from = off;
                    off += used;
                    match self.on_frame(ctx, conn, &f) {
                        Next::Continue => {}
                        Next::Park => break,
                        Next::Stop => {
                            alive = false;
                            break;
                        }
                        Next::HandOff(shard) => {
                            let buffered = bytes[rest_from..].to_vec();
                            let accepted_us = self.conns.get(&conn).map_or(0, |c| c.accepted_us);
                            let tls = self.conns.get_mut(&conn).and_then(|c| c.tls.take());
                            self.drop_conn(ctx, conn, false);
                            debug!(
                                shard = self.index,
                                to = shard,
                                "resume handed off to the owning shard"
                            );
                            ctx.hand_off(
                                conn,
                                shard,
                                ShardMsg::Resume {
                                    buffered,
                                    accepted_at: self.clock.instant_us(accepted_us),
                                    tls,
                                },
                            );
                            return (bytes.len(), false);
                        }
                    }
                }
            }
        }
        // One coalesced ACK per batch of input for RELIABLE clients.
        if alive {
            if let Some(Conn {
                state: ConnState::Bound(sid),
                ..
            }) = self.conns.get(&conn)
            {
                let sid = *sid;
                let now = self.now(ctx);
                if let Some(s) = self.table.get_mut(sid) {
                    s.end_batch(now, &mut self.scratch);
                    let key = (s.tenant(), s.agent());
                    self.flush(ctx, Some(conn), key);
                }
            }
        }
        (off, alive)
    }

    /// The stream is broken (bad flag or CRC, oversize LEN): ERROR, close; a bound session is
    /// suspended with its ring intact.
    fn broken(&mut self, ctx: &mut Ctx<'_, ShardMsg>, conn: ConnId, code: ErrorCode) {
        match self.conns.get(&conn).map(|c| c.state) {
            Some(ConnState::Bound(sid)) => {
                let now = self.now(ctx);
                if let Some(s) = self.table.get_mut(sid) {
                    let flow = s.fail(code, now, &mut self.scratch);
                    let key = (s.tenant(), s.agent());
                    self.flush(ctx, Some(conn), key);
                    self.apply_flow(ctx, sid, Some(conn), flow);
                }
            }
            Some(ConnState::Handshake) => self.refuse(ctx, conn, code),
            None => {}
        }
    }

    fn on_frame(&mut self, ctx: &mut Ctx<'_, ShardMsg>, conn: ConnId, f: &Frame<'_>) -> Next {
        let Some(state) = self.conns.get(&conn).map(|c| c.state) else {
            return Next::Stop;
        };
        match state {
            ConnState::Handshake => match f.ty {
                FrameType::Connect => self.on_connect(ctx, conn, f),
                FrameType::Resume => self.on_resume(ctx, conn, f),
                _ => {
                    self.refuse(ctx, conn, ErrorCode::ProtocolViolation);
                    Next::Stop
                }
            },
            ConnState::Bound(sid) => {
                let now = self.now(ctx);
                let cfg = &self.shared.cfg.session;
                let Some(s) = self.table.get_mut(sid) else {
                    self.drop_conn(ctx, conn, true);
                    return Next::Stop;
                };
                if matches!(f.ty, FrameType::Unknown(_) | FrameType::Nack) {
                    ShardMetrics::inc(&self.shared.metrics.shards[self.index].unknown_frames, 1);
                }
                let flow = s.on_client_frame(f, now, cfg, &mut self.scratch);
                let key = (s.tenant(), s.agent());
                if flow == Flow::Continue {
                    // Client → pod bytes are flushed per frame so DATA boundaries and order
                    // are kept; the client side is flushed once per batch.
                    if !self.scratch.pod.is_empty() {
                        self.flush(ctx, None, key);
                        // A pod that reads slower than this client writes: stop reading the
                        // client until the link drains, so the link's queue stays bounded.
                        if let Some(l) = self.links.get_mut(key) {
                            if l.over_limit(l.connected && ctx.is_backpressured(l.conn)) {
                                ctx.set_reading(conn, false);
                                l.paused_readers.push(conn);
                            }
                        }
                    }
                    return Next::Continue;
                }
                self.flush(ctx, Some(conn), key);
                self.apply_flow(ctx, sid, Some(conn), flow);
                Next::Stop
            }
        }
    }

    fn on_connect(&mut self, ctx: &mut Ctx<'_, ShardMsg>, conn: ConnId, f: &Frame<'_>) -> Next {
        if f.session_id != 0 {
            self.refuse(ctx, conn, ErrorCode::ProtocolViolation);
            return Next::Stop;
        }
        // Order of checks (§2.1): version, shape, token, agent, capacity.
        let c = match Connect::parse(f.payload) {
            Ok(c) => c,
            Err(e) => {
                self.refuse(ctx, conn, e.code);
                return Next::Stop;
            }
        };
        if !self.shared.check_token(c.tenant_id, c.agent_id, &c.token) {
            info!(
                shard = self.index,
                tenant = c.tenant_id,
                agent = c.agent_id,
                "CONNECT refused: bad token"
            );
            self.auth_failed(ctx, conn);
            self.refuse(ctx, conn, ErrorCode::AuthFailed);
            return Next::Stop;
        }
        let key = (c.tenant_id, c.agent_id);
        if !self.shared.pod_present(key.0, key.1) || !self.ensure_link(ctx, key) {
            self.refuse(ctx, conn, ErrorCode::NoAgent);
            return Next::Stop;
        }
        if let Some(l) = self.links.get_mut(key) {
            if !l.connected {
                // The link is still connecting: the CONNECT waits for it, so a pod whose socket
                // exists but refuses us gives NO_AGENT rather than a session with no agent.
                l.waiting.push((conn, c.caps));
                ctx.set_reading(conn, false);
                return Next::Park;
            }
        }
        self.open_session(ctx, conn, key, c.caps)
    }

    /// The CONNECT passed every check but capacity and the link is up: open the session.
    fn open_session(
        &mut self,
        ctx: &mut Ctx<'_, ShardMsg>,
        conn: ConnId,
        key: (u32, u32),
        caps: u8,
    ) -> Next {
        if !self.shared.reserve_session() {
            self.refuse(ctx, conn, ErrorCode::Overloaded);
            return Next::Stop;
        }
        let now = self.now(ctx);
        let Some(peer) = self.conns.get(&conn).map(|c| c.peer) else {
            return Next::Stop;
        };
        let peer_s = peer.to_string();
        let s = self
            .table
            .create(|id, token| Session::new(id, key.0, key.1, caps, token, now));
        let sid = s.id();
        s.accept(CAP_RELIABLE | CAP_ROAM, &peer_s, now, &mut self.scratch);
        if let Some(l) = self.links.get_mut(key) {
            l.sessions.insert(sid);
        }
        if let Some(cs) = self.conns.get_mut(&conn) {
            cs.state = ConnState::Bound(sid);
        }
        self.pending_handshakes -= 1;
        self.attached.insert(sid, conn);
        self.flush(ctx, Some(conn), key);
        self.arm(ctx, sid);
        let now_us = self.clock.us(ctx.now());
        self.m().handshake.observe_us(
            now_us.saturating_sub(self.conns.get(&conn).map_or(now_us, |c| c.accepted_us)),
        );
        debug!(
            shard = self.index,
            session = sid,
            tenant = key.0,
            agent = key.1,
            "session opened"
        );
        Next::Continue
    }

    fn on_resume(&mut self, ctx: &mut Ctx<'_, ShardMsg>, conn: ConnId, f: &Frame<'_>) -> Next {
        let r = match Resume::parse(f.payload) {
            Ok(r) => r,
            Err(e) => {
                self.refuse(ctx, conn, e.code);
                return Next::Stop;
            }
        };
        let sid = r.session_id();
        if f.session_id != 0 && f.session_id != sid {
            self.refuse(ctx, conn, ErrorCode::ProtocolViolation);
            return Next::Stop;
        }
        if matches!(r, Resume::Legacy { .. }) && !self.shared.cfg.allow_legacy_resume {
            self.refuse(ctx, conn, ErrorCode::AuthFailed);
            return Next::Stop;
        }
        let owner = self.table.ids().owner(sid);
        if owner >= self.shared.cfg.shards || sid == 0 {
            self.auth_failed(ctx, conn);
            self.refuse(ctx, conn, ErrorCode::NoSuchSession);
            return Next::Stop;
        }
        if owner != self.index {
            return Next::HandOff(owner);
        }
        let now = self.now(ctx);
        let (from, found) = match r {
            Resume::Full {
                last_seq, token, ..
            } => (
                ResumeFrom::LastSeq(last_seq),
                self.table.get_with_token(sid, &token).is_some(),
            ),
            Resume::Legacy { .. } => (ResumeFrom::Unacknowledged, self.table.get(sid).is_some()),
        };
        let usable = found
            && self
                .table
                .get(sid)
                .is_some_and(|s| s.state() != State::Closed);
        if !usable {
            self.auth_failed(ctx, conn);
            self.refuse(ctx, conn, ErrorCode::NoSuchSession);
            return Next::Stop;
        }
        // Newest RESUME wins: the old connection is told and closed.
        if let Some(old) = self.attached.remove(&sid) {
            if let Some(s) = self.table.get_mut(sid) {
                s.take_over(now, &mut self.scratch);
                let key = (s.tenant(), s.agent());
                self.flush(ctx, Some(old), key);
            }
            self.drop_conn(ctx, old, true);
            debug!(shard = self.index, session = sid, "session taken over");
        }
        let cfg = &self.shared.cfg.session;
        let Some(s) = self.table.get_mut(sid) else {
            return Next::Stop;
        };
        let flow = s.resume(from, now, cfg, &mut self.scratch);
        let key = (s.tenant(), s.agent());
        let replayed = s.ring().payload_bytes() as u64;
        let now_us = self.clock.us(ctx.now());
        let (accepted_us, adopted) = self
            .conns
            .get(&conn)
            .map_or((now_us, false), |c| (c.accepted_us, c.adopted));
        let m = &self.shared.metrics.shards[self.index];
        ShardMetrics::inc(&m.replay_bytes, replayed);
        ShardMetrics::inc(
            if adopted {
                &m.resumes_cross_shard
            } else {
                &m.resumes_same_shard
            },
            1,
        );
        m.resume.observe_us(now_us.saturating_sub(accepted_us));
        if let Some(cs) = self.conns.get_mut(&conn) {
            cs.state = ConnState::Bound(sid);
        }
        self.pending_handshakes -= 1;
        self.attached.insert(sid, conn);
        self.flush(ctx, Some(conn), key);
        self.apply_flow(ctx, sid, Some(conn), flow);
        if flow == Flow::Continue {
            Next::Continue
        } else {
            Next::Stop
        }
    }

    fn on_link_data(
        &mut self,
        ctx: &mut Ctx<'_, ShardMsg>,
        link_conn: ConnId,
        key: (u32, u32),
        data: &[u8],
    ) {
        let mut buf = match self.links.get_mut(key) {
            Some(l) => std::mem::take(&mut l.inbuf),
            None => return,
        };
        let owned;
        let bytes: &[u8] = if buf.is_empty() {
            data
        } else {
            buf.extend_from_slice(data);
            owned = std::mem::take(&mut buf);
            &owned
        };
        let mut off = 0;
        let mut broken = false;
        while off < bytes.len() {
            match podlink::decode(&bytes[off..]) {
                Err(e) => {
                    warn!(shard = self.index, ?key, error = %e, "pod link broken");
                    broken = true;
                    break;
                }
                Ok(podlink::Decoded::NeedMore(_)) => break,
                Ok(podlink::Decoded::Msg {
                    session_id,
                    msg,
                    used,
                }) => {
                    off += used;
                    if !self.on_pod_msg(ctx, key, session_id, msg) {
                        broken = true;
                        break;
                    }
                }
            }
        }
        if broken {
            ctx.close(link_conn);
            self.link_down(ctx, key);
            return;
        }
        if let Some(l) = self.links.get_mut(key) {
            let mut rest = buf;
            rest.clear();
            rest.extend_from_slice(&bytes[off..]);
            l.inbuf = rest;
        }
    }

    /// One message from a pod. Returns false when the link must be broken.
    fn on_pod_msg(
        &mut self,
        ctx: &mut Ctx<'_, ShardMsg>,
        key: (u32, u32),
        sid: u32,
        msg: PodMsg<'_>,
    ) -> bool {
        let Some(l) = self.links.get_mut(key) else {
            return false;
        };
        if !l.hello_seen {
            if let PodMsg::Hello { version, name } = msg {
                if version != podlink::codec::VERSION {
                    warn!(
                        shard = self.index,
                        ?key,
                        version,
                        name,
                        "pod HELLO has unsupported version {version} (this server speaks {}); breaking the link",
                        podlink::codec::VERSION
                    );
                    return false;
                }
                l.hello_seen = true;
                debug!(shard = self.index, ?key, version, name, "pod HELLO");
                return true;
            }
            warn!(
                shard = self.index,
                ?key,
                "pod sent {} before HELLO",
                msg.ty().name()
            );
            return false;
        }
        let now = self.now(ctx);
        let cfg = &self.shared.cfg.session;
        let Some(s) = self.table.get_mut(sid) else {
            return true; // a session that ended meanwhile
        };
        if (s.tenant(), s.agent()) != key {
            warn!(
                shard = self.index,
                ?key,
                session = sid,
                "pod sent a message for another pod's session"
            );
            return true;
        }
        let conn = self.attached.get(&sid).copied();
        let flow = match msg {
            PodMsg::Data(d) => {
                s.on_agent_data(d, now, cfg, &mut self.scratch);
                Flow::Continue
            }
            PodMsg::Close(_) => s.on_agent_close(now, &mut self.scratch),
            _ => Flow::Continue,
        };
        self.flush(ctx, conn, key);
        if flow == Flow::Continue && conn.is_some() {
            // No re-arm needed for output: it only moves deadlines later.
            return true;
        }
        self.apply_flow(ctx, sid, conn, flow);
        true
    }

    /// The link to a pod broke (EOF, error, broken framing) or its socket disappeared: its
    /// sessions wait for the pod for `--agent-grace`, their input held; attached clients stay.
    fn link_down(&mut self, ctx: &mut Ctx<'_, ShardMsg>, key: (u32, u32)) {
        let grace = self.shared.cfg.agent_grace_ms;
        let now = self.now(ctx);
        let Some(l) = self.links.get(key) else { return };
        if l.lost_since.is_some() {
            // A reconnect attempt failed: keep waiting within the same grace period.
            self.links.mark_lost(key, now);
            self.schedule_retry(ctx, key);
            return;
        }
        if grace == 0 || l.sessions.is_empty() {
            self.agent_gone(ctx, key);
            return;
        }
        info!(
            shard = self.index,
            tenant = key.0,
            agent = key.1,
            sessions = l.sessions.len(),
            grace_ms = grace,
            "pod lost; sessions wait for it"
        );
        self.links.mark_lost(key, now);
        self.wheel.insert(now + grace, Key::Grace(key));
        self.schedule(ctx, now + grace);
        self.schedule_retry(ctx, key);
    }

    /// While the pod's socket is still registered (a pod restarting in place, or one whose
    /// socket exists but refused us), retry connecting with backoff within the grace period.
    fn schedule_retry(&mut self, ctx: &mut Ctx<'_, ShardMsg>, key: (u32, u32)) {
        if !self.shared.pod_present(key.0, key.1) {
            return; // it will be reconnected when its socket appears
        }
        let now = self.now(ctx);
        if let Some(l) = self.links.get_mut(key) {
            let d = now + l.retry_ms;
            l.retry_ms = (l.retry_ms * 2).min(pods::Link::MAX_RETRY_MS);
            self.wheel.insert(d, Key::Retry(key));
            self.schedule(ctx, d);
        }
    }

    /// A pod socket appeared: a lost link to it reconnects, with HELLO, a REOPEN for each of
    /// its sessions, then the input held meanwhile.
    fn pod_added(&mut self, ctx: &mut Ctx<'_, ShardMsg>, key: (u32, u32)) {
        let Some(l) = self.links.get(key) else { return };
        if l.lost_since.is_none() || self.links.key_of(l.conn).is_some() {
            return; // not lost, or a reconnect is already in flight
        }
        let path = pods::socket_path(&self.shared.cfg.socket_dir, key.0, key.1);
        let conn = match ctx.connect_unix(&path) {
            Ok(c) => c,
            Err(e) => {
                debug!(shard = self.index, path = %path.display(), error = %e, "pod not reachable yet");
                self.schedule_retry(ctx, key);
                return;
            }
        };
        let mut prefix = Vec::new();
        let name = format!("clawtermd shard {}", self.index);
        podlink::encode(
            &mut prefix,
            0,
            &PodMsg::Hello {
                version: podlink::codec::VERSION,
                name: &name,
            },
        );
        let sessions: Vec<u32> = l.sessions.iter().copied().collect();
        for sid in sessions {
            let Some(s) = self.table.get(sid) else {
                continue;
            };
            let peer = self
                .attached
                .get(&sid)
                .and_then(|c| self.conns.get(c))
                .map(|c| c.peer.to_string())
                .unwrap_or_default();
            podlink::encode(
                &mut prefix,
                sid,
                &PodMsg::Reopen(podlink::Open {
                    tenant: key.0,
                    agent: key.1,
                    client_caps: s.caps(),
                    peer: &peer,
                }),
            );
            if s.state() == State::Suspended {
                podlink::encode(&mut prefix, sid, &PodMsg::Detached);
            }
            if s.pod_paused() {
                podlink::encode(&mut prefix, sid, &PodMsg::Pause);
            }
        }
        info!(
            shard = self.index,
            tenant = key.0,
            agent = key.1,
            "pod back; reopening its sessions"
        );
        self.links.reconnect(key, conn, prefix);
    }

    /// The grace period of a lost pod ran out.
    fn grace_expired(&mut self, ctx: &mut Ctx<'_, ShardMsg>, key: (u32, u32)) {
        let now = self.now(ctx);
        let grace = self.shared.cfg.agent_grace_ms;
        if let Some(l) = self.links.get(key) {
            if l.lost_since.is_some_and(|t| t + grace <= now) {
                if !l.connected && l.lost_since.is_some() {
                    // A reconnect in flight: forget it too.
                    let c = l.conn;
                    if self.links.key_of(c).is_some() {
                        ctx.abort(c);
                    }
                }
                self.agent_gone(ctx, key);
            }
        }
    }

    /// The pod is gone for good: its sessions on this shard end with AGENT_GONE, after the
    /// output the pod already produced.
    fn agent_gone(&mut self, ctx: &mut Ctx<'_, ShardMsg>, key: (u32, u32)) {
        let Some(link) = self.links.remove(key) else {
            return;
        };
        info!(
            shard = self.index,
            tenant = key.0,
            agent = key.1,
            sessions = link.sessions.len(),
            "pod gone for good"
        );
        let now = self.now(ctx);
        for sid in link.sessions {
            let conn = self.attached.get(&sid).copied();
            let Some(s) = self.table.get_mut(sid) else {
                continue;
            };
            let flow = s.on_agent_gone(now, &mut self.scratch);
            self.scratch.pod.clear();
            self.flush(ctx, conn, key);
            self.apply_flow(ctx, sid, conn, flow);
        }
    }

    fn on_timers(&mut self, ctx: &mut Ctx<'_, ShardMsg>) {
        let now = self.now(ctx);
        let mut fired = std::mem::take(&mut self.fired);
        self.wheel.poll(now, &mut fired);
        for (deadline, key) in fired.drain(..) {
            match key {
                Key::Handshake(conn) => {
                    if self
                        .conns
                        .get(&conn)
                        .is_some_and(|c| c.state == ConnState::Handshake)
                    {
                        debug!(shard = self.index, ?conn, "handshake timeout");
                        self.drop_conn(ctx, conn, false);
                        ctx.abort(conn);
                    }
                }
                Key::Grace(pod) => self.grace_expired(ctx, pod),
                Key::Stats => {
                    self.publish_gauges();
                    self.limiter.sweep(now);
                    self.wheel.insert(now + STATS_EVERY_MS, Key::Stats);
                }
                Key::Retry(pod) => {
                    let waiting = self.links.get(pod).is_some_and(|l| {
                        l.lost_since.is_some() && self.links.key_of(l.conn).is_none()
                    });
                    if waiting {
                        self.pod_added(ctx, pod);
                    }
                }
                Key::Session(sid) => {
                    let cfg = &self.shared.cfg.session;
                    let Some(s) = self.table.get_mut(sid) else {
                        continue;
                    };
                    if s.armed != deadline {
                        continue; // re-armed since; stale entry
                    }
                    s.armed = 0;
                    let flow = s.on_timer(now, cfg, &mut self.scratch);
                    let key = (s.tenant(), s.agent());
                    let conn = self.attached.get(&sid).copied();
                    self.flush(ctx, conn, key);
                    self.apply_flow(ctx, sid, conn, flow);
                }
            }
        }
        self.fired = fired;
        self.next_wake = NO_WAKE;
        if let Some(d) = self.wheel.next_deadline() {
            self.schedule(ctx, d.max(now));
        }
    }
}

#[derive(PartialEq, Eq)]
enum Next {
    Continue,
    Stop,
    HandOff(usize),
    /// Stop decoding for now (reading is paused); what follows stays buffered.
    Park,
}

impl shards::Handler for ShardHandler {
    type Msg = ShardMsg;

    fn on_start(&mut self, ctx: &mut Ctx<'_, ShardMsg>) {
        let d = self.now(ctx) + STATS_EVERY_MS;
        self.wheel.insert(d, Key::Stats);
        self.schedule(ctx, d);
        self.publish_gauges();
        self.shared
            .metrics
            .ready_shards
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    fn on_accept(&mut self, ctx: &mut Ctx<'_, ShardMsg>, conn: ConnId, peer: SocketAddr) {
        if self.pending_handshakes >= self.shared.cfg.max_pending_handshakes {
            // §6: a connection limit is OVERLOADED. Nothing can be sent before a TLS handshake,
            // so a TLS connection is only aborted.
            debug!(shard = self.index, ?conn, %peer, "too many pending handshakes; refused");
            if self.shared.tls.is_some() {
                ctx.abort(conn);
            } else {
                self.refuse(ctx, conn, ErrorCode::Overloaded);
            }
            return;
        }
        let accepted_us = self.clock.us(ctx.now());
        if !self.limiter.allow_connection(peer.ip(), accepted_us / 1000) {
            if self.shared.tls.is_some() {
                ctx.abort(conn); // no frame can be sent before the TLS handshake
            } else {
                self.refuse(ctx, conn, ErrorCode::RateLimited);
            }
            return;
        }
        let tls = match &self.shared.tls {
            Some(t) => match t.accept() {
                Ok(c) => Some(Box::new(c)),
                Err(e) => {
                    warn!(shard = self.index, error = %e, "cannot start TLS");
                    ctx.abort(conn);
                    return;
                }
            },
            None => None,
        };
        self.pending_handshakes += 1;
        self.conns.insert(
            conn,
            Conn {
                state: ConnState::Handshake,
                inbuf: Vec::new(),
                peer,
                accepted_us,
                adopted: false,
                tls,
            },
        );
        let d = self.now(ctx) + self.shared.cfg.handshake_ms;
        self.wheel.insert(d, Key::Handshake(conn));
        self.schedule(ctx, d);
    }

    fn on_data(&mut self, ctx: &mut Ctx<'_, ShardMsg>, conn: ConnId, data: &[u8]) {
        if let Some(key) = self.links.key_of(conn) {
            self.on_link_data(ctx, conn, key, data);
            return;
        }
        ShardMetrics::inc(&self.m().bytes_in, data.len() as u64);
        if self.conns.get(&conn).is_some_and(|c| c.tls.is_some()) {
            self.on_tls_data(ctx, conn, data);
        } else {
            self.on_plaintext(ctx, conn, data);
        }
    }

    fn on_closed(
        &mut self,
        ctx: &mut Ctx<'_, ShardMsg>,
        conn: ConnId,
        err: Option<std::io::Error>,
    ) {
        if let Some(key) = self.links.key_of(conn) {
            debug!(shard = self.index, ?key, error = ?err, "pod link closed");
            self.link_down(ctx, key);
            return;
        }
        debug!(shard = self.index, ?conn, error = ?err, "connection closed by peer");
        self.conn_lost(ctx, conn, false);
    }

    fn on_connected(
        &mut self,
        ctx: &mut Ctx<'_, ShardMsg>,
        conn: ConnId,
        res: std::io::Result<()>,
    ) {
        let Some(key) = self.links.key_of(conn) else {
            return;
        };
        match res {
            Ok(()) => {
                let waiting = self
                    .links
                    .get_mut(key)
                    .map(|l| std::mem::take(&mut l.waiting))
                    .unwrap_or_default();
                if let Some(l) = self.links.get_mut(key) {
                    l.connected = true;
                    l.lost_since = None;
                    l.retry_ms = pods::Link::FIRST_RETRY_MS;
                    let pending = std::mem::take(&mut l.pending);
                    ctx.send(conn, &pending);
                    if !ctx.is_backpressured(conn) {
                        for c in l.paused_readers.drain(..) {
                            if self.conns.contains_key(&c) {
                                ctx.set_reading(c, true);
                            }
                        }
                    }
                }
                // CONNECTs that waited for this link now open their sessions.
                for (c, caps) in waiting {
                    if !self
                        .conns
                        .get(&c)
                        .is_some_and(|x| x.state == ConnState::Handshake)
                    {
                        continue;
                    }
                    ctx.set_reading(c, true);
                    if self.open_session(ctx, c, key, caps) == Next::Continue {
                        // Frames that came after the CONNECT.
                        let buf = self
                            .conns
                            .get_mut(&c)
                            .map(|x| std::mem::take(&mut x.inbuf))
                            .unwrap_or_default();
                        if !buf.is_empty() {
                            self.on_plaintext(ctx, c, &buf);
                        }
                    }
                }
            }
            Err(e) => {
                let waiting = self
                    .links
                    .get_mut(key)
                    .map(|l| std::mem::take(&mut l.waiting))
                    .unwrap_or_default();
                for (c, _) in waiting {
                    if self
                        .conns
                        .get(&c)
                        .is_some_and(|x| x.state == ConnState::Handshake)
                    {
                        self.refuse(ctx, c, ErrorCode::NoAgent);
                    }
                }
                warn!(shard = self.index, ?key, error = %e, "pod link connect failed");
                self.link_down(ctx, key);
            }
        }
    }

    fn on_writable(&mut self, ctx: &mut Ctx<'_, ShardMsg>, conn: ConnId) {
        let Some(key) = self.links.key_of(conn) else {
            return;
        };
        if let Some(l) = self.links.get_mut(key) {
            for c in l.paused_readers.drain(..) {
                if self.conns.contains_key(&c) {
                    ctx.set_reading(c, true);
                }
            }
        }
    }

    fn on_message(&mut self, ctx: &mut Ctx<'_, ShardMsg>, msg: ShardMsg) {
        match msg {
            ShardMsg::PodAdded(t, a) => self.pod_added(ctx, (t, a)),
            ShardMsg::PodRemoved(t, a) => {
                let key = (t, a);
                if let Some(l) = self.links.get(key) {
                    if l.lost_since.is_none() {
                        let c = l.conn;
                        ctx.close(c);
                        self.link_down(ctx, key);
                    }
                }
            }
            ShardMsg::Resume { .. } => {}
        }
    }

    fn on_adopt(
        &mut self,
        ctx: &mut Ctx<'_, ShardMsg>,
        conn: ConnId,
        peer: SocketAddr,
        unread: Vec<u8>,
        msg: ShardMsg,
    ) {
        let ShardMsg::Resume {
            buffered,
            accepted_at,
            tls,
        } = msg
        else {
            ctx.abort(conn);
            return;
        };
        let accepted_us = self.clock.us(accepted_at);
        self.pending_handshakes += 1;
        self.conns.insert(
            conn,
            Conn {
                state: ConnState::Handshake,
                inbuf: Vec::new(),
                peer,
                accepted_us,
                adopted: true,
                tls,
            },
        );
        let d = self.now(ctx) + self.shared.cfg.handshake_ms;
        self.wheel.insert(d, Key::Handshake(conn));
        self.schedule(ctx, d);
        // The plaintext the old shard had decoded (the RESUME and what followed it) first, then
        // the bytes that arrived while the connection was in transit.
        self.on_plaintext(ctx, conn, &buffered);
        if !unread.is_empty() && self.conns.contains_key(&conn) {
            self.on_data(ctx, conn, &unread);
        }
    }

    fn on_tick(&mut self, ctx: &mut Ctx<'_, ShardMsg>, _now: Instant) {
        self.on_timers(ctx);
    }

    fn on_shutdown(&mut self, ctx: &mut Ctx<'_, ShardMsg>) {
        self.shared
            .metrics
            .ready_shards
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        let ids: Vec<u32> = self.table.ids_iter().collect();
        for sid in ids {
            if let Some(s) = self.table.get_mut(sid) {
                s.close(CloseReason::Normal, &mut self.scratch);
                let key = (s.tenant(), s.agent());
                self.flush(ctx, None, key);
            }
            self.remove_session(sid);
        }
        let conns: Vec<ConnId> = self.conns.keys().copied().collect();
        for c in conns {
            self.drop_conn(ctx, c, true);
        }
        for key in self.links.keys() {
            if let Some(l) = self.links.remove(key) {
                ctx.close(l.conn);
            }
        }
        info!(shard = self.index, "shard stopped");
    }
}
