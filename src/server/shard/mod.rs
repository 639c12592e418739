//! The per-core handler: connections, sessions, pod links and timers of one shard.
//!
//! The reactor (`shards`) moves bytes and events; this handler decodes frames, asks the sans-IO
//! session core what to do, and routes what it writes: client frames to the session's
//! connection, pod messages to the shard's link for the session's pod. Sessions are entries of
//! the shard's [`SessionTable`]; no task exists per session or per connection.

mod clients;
mod export;
mod flow;
mod handoff;
mod handshake;
mod persist;
mod podlinks;
mod quic;
mod relay;
mod roam;
mod sink;
mod timers;
mod websocket;

pub use handoff::ShardMsg;
pub use persist::{Moved, Restore};
pub use relay::route as relay_route;
use sink::Scratch;

pub use clients::Client;
use clients::{Clients, Conn, ConnState, Written};

use super::limits::Limiter;
use super::metrics::ShardMetrics;
use super::quic::{QEvent, QuicShard};
use super::Shared;
use crate::podlink::CloseReason;
use crate::pods::links::Links;
use crate::proto::{
    self, handshake::Early, payload::ErrorFrame, Decoded, ErrorCode, Frame, FrameType,
};
use crate::session::table::IdMap;
use crate::session::{Clock, Flow, IdSpace, SessionTable};
use crate::state::Journal;
use shards::timer::Wheel;
use shards::{ConnId, Context};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;
use tracing::{debug, info};

#[derive(Copy, Clone, Debug)]
enum Key {
    Session(u32),
    Handshake(Client),
    /// A QUIC connection's timer (quinn handle, our generation).
    Quic(u32, u32),
    /// The agent grace period of a lost pod.
    Grace((u32, u32)),
    /// Retry connecting to a lost pod whose socket is still registered.
    Retry((u32, u32)),
    /// Refresh the gauges in the metrics.
    Stats,
    /// A ClawRoam move's deadline or poll (`roam.rs`).
    Roam(u32),
}

const STATS_EVERY_MS: u64 = 1000;

/// One shard's state.
pub struct ShardHandler {
    /// Unmasked WebSocket payload of the read being handled (reused; `websocket.rs`).
    ws_payload: Vec<u8>,
    /// WebSocket control frames to answer with (reused).
    ws_replies: Vec<u8>,
    index: usize,
    shared: Arc<Shared>,
    clock: Clock,
    table: SessionTable,
    /// The client connections and their transports.
    clients: Clients,
    /// The connection each attached session is bound to.
    attached: IdMap<u32, Client>,
    links: Links<Client>,
    wheel: Wheel<Key>,
    fired: Vec<(u64, Key)>,
    next_wake: u64,
    pending_handshakes: usize,
    scratch: Scratch,
    /// Per-source-address limits.
    limiter: Limiter,
    /// QUIC events being handled (reused).
    qevents: Vec<QEvent>,
    /// The shard's state journal (`--state-dir`), if any.
    journal: Option<Journal>,
    /// Sessions restored from the state dir (or handed over), taken at start.
    restore_records: Vec<Vec<u8>>,
    /// Client input held for pods that were away, taken at start.
    restore_held: crate::state::Held,
    /// Connections and links handed over by the process this one replaces, taken at start.
    moved: Option<Moved>,
    /// Handing everything over to a new process (live upgrade).
    exporting: Option<export::Exporting>,
    /// Everything was handed over: this shard serves nothing any more.
    exported_done: bool,
    /// A live upgrade began ([`ShardMsg::Quiesce`]): cross-shard hand-offs are held.
    quiescing: bool,
    /// Who waits for the runtime to let go of the listener.
    quiesce_reply: Option<crossbeam_channel::Sender<usize>>,
    /// The runtime let go of the listener (`on_accept_stopped`).
    accept_stopped_seen: bool,
    /// The new process of a live upgrade, before its part arrived, and the connections other
    /// shards handed it meanwhile.
    awaiting: bool,
    queued_adopts: Vec<(ConnId, SocketAddr, Vec<u8>, ShardMsg)>,
    /// ClawRoam: sessions leaving, arriving, gone elsewhere (`roam.rs`).
    roam: roam::Roaming,
    /// ClawRoam: clients relayed to (or from) other nodes (`relay.rs`).
    relays: relay::Relays,
}

/// Client → pod bytes of one batch of input sent to the link early past this size.
const POD_BATCH_MAX: usize = 64 * 1024;

const NO_WAKE: u64 = u64::MAX;

impl ShardHandler {
    pub fn new(index: usize, shared: Arc<Shared>, restore: Restore) -> ShardHandler {
        // The session clock starts a day along, so the ages a restored session brings (last
        // receive, last send) fit without saturating at 0.
        let started = Instant::now();
        let clock = Clock::new(
            started
                .checked_sub(std::time::Duration::from_secs(86_400))
                .unwrap_or(started),
        );
        let quic = shared
            .quic
            .as_ref()
            .map(|q| QuicShard::new(index, q.clone(), shared.cfg.max_pending_handshakes));
        let limiter = Limiter::new(
            shared.cfg.conn_rate_per_ip,
            shared.cfg.max_auth_failures_per_ip,
        );
        let scratch = Scratch {
            client: Vec::new(),
            frames: Written::default(),
            pod: Vec::new(),
            metrics: shared.metrics.clone(),
            shard: index,
        };
        ShardHandler {
            ws_payload: Vec::new(),
            ws_replies: Vec::new(),
            index,
            table: SessionTable::new(
                IdSpace::new(index, shared.cfg.shards)
                    .with_node(shared.cluster.as_ref().map_or(0, |c| c.keeper.ordinal())),
            ),
            clients: Clients::new(index, shared.metrics.clone(), quic, shared.cluster.clone()),
            shared,
            clock,
            attached: IdMap::default(),
            links: Links::default(),
            wheel: Wheel::new(clock.ms(started)),
            fired: Vec::new(),
            next_wake: NO_WAKE,
            pending_handshakes: 0,
            scratch,
            limiter,
            qevents: Vec::new(),
            journal: restore.journal,
            restore_records: restore.records,
            restore_held: restore.held,
            moved: restore.moved,
            exporting: None,
            exported_done: false,
            quiescing: false,
            quiesce_reply: None,
            accept_stopped_seen: false,
            awaiting: restore.awaiting,
            queued_adopts: Vec::new(),
            roam: roam::Roaming::default(),
            relays: relay::Relays::default(),
        }
    }

    /// Notes a failed authentication (AUTH_FAILED, NO_SUCH_SESSION) of `conn`'s address.
    fn auth_failed(&mut self, ctx: &impl Context<ShardMsg>, conn: Client) {
        if let Some(c) = self.clients.conns.get(&conn) {
            let now = self.clock.ms(ctx.now());
            self.limiter.auth_failed(c.peer.ip(), now);
        }
    }

    fn m(&self) -> &ShardMetrics {
        &self.shared.metrics.shards[self.index]
    }

    /// Ciphertext from a TLS connection: decrypt it all, then process the plaintext (`ws`: a
    /// connection of the WebSocket port, whose plaintext is HTTP, then WebSocket frames).
    fn on_tls_data(
        &mut self,
        ctx: &mut impl Context<ShardMsg>,
        conn: Client,
        data: &[u8],
        ws: bool,
    ) {
        match self.clients.decrypt(ctx, conn, data) {
            Err(e) => {
                debug!(?conn, error = %e, "TLS failure; closing");
                self.conn_lost(ctx, conn, true);
            }
            Ok(plain) => {
                if !plain.is_empty() {
                    if ws {
                        self.on_ws_bytes(ctx, conn, &plain);
                    } else {
                        self.on_plaintext(ctx, conn, &plain);
                    }
                }
                self.clients.recycle(plain);
            }
        }
    }

    /// Plaintext bytes from a client: frames are decoded straight from them when no partial
    /// frame is pending (no copy); a trailing partial frame is kept in the connection's buffer.
    fn on_plaintext(&mut self, ctx: &mut impl Context<ShardMsg>, conn: Client, data: &[u8]) {
        let Some(c) = self.clients.conns.get_mut(&conn) else {
            return;
        };
        if c.state == ConnState::Relayed {
            self.relay_forward(ctx, conn, data);
            return;
        }
        if c.inbuf.is_empty() {
            // Fast path: decode straight from the receive buffer.
            let (used, alive) = self.process(ctx, conn, data);
            if alive && used < data.len() {
                if let Some(c) = self.clients.conns.get_mut(&conn) {
                    c.inbuf.extend_from_slice(&data[used..]);
                }
            }
        } else {
            let mut buf = std::mem::take(&mut c.inbuf);
            buf.extend_from_slice(data);
            let (used, alive) = self.process(ctx, conn, &buf);
            if alive {
                if let Some(c) = self.clients.conns.get_mut(&conn) {
                    if used < buf.len() {
                        buf.drain(..used);
                        c.inbuf = buf;
                    }
                }
            }
        }
    }

    /// The connection is gone or must go: a bound session is suspended.
    fn conn_lost(&mut self, ctx: &mut impl Context<ShardMsg>, conn: Client, close: bool) {
        let Some(c) = self.clients.conns.get(&conn) else {
            return;
        };
        if let ConnState::Bound(sid) = c.state {
            if self.attached.get(&sid) == Some(&conn) {
                let now = self.now(ctx);
                if let Some(s) = self.table.get_mut(sid) {
                    s.detach(now, &self.shared.cfg.session, &mut self.scratch);
                    let key = (s.tenant(), s.agent());
                    self.flush(ctx, None, key);
                }
                self.drop_conn(ctx, conn, close);
                self.arm(ctx, sid);
                debug!(session = sid, "connection lost; session suspended");
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
        ShardMetrics::set(&m.connections, self.clients.conns.len() as u64);
        ShardMetrics::set(&m.pod_links, self.links.connected() as u64);
        ShardMetrics::set(&m.relays_anchored, self.relays.anchored() as u64);
        if let Some(q) = self.clients.quic.as_ref() {
            ShardMetrics::set(&m.quic_connections, q.counts().connections);
        }
        let ring: u64 = self
            .table
            .iter()
            .map(|s| s.ring().payload_bytes() as u64)
            .sum();
        ShardMetrics::set(&m.ring_bytes, ring);
    }

    fn now(&self, ctx: &impl Context<ShardMsg>) -> u64 {
        self.clock.ms(ctx.now())
    }

    /// Sends what the scratch sink collected: client bytes to `conn`, pod bytes to the link of
    /// `pod`.
    fn flush(&mut self, ctx: &mut impl Context<ShardMsg>, conn: Option<Client>, pod: (u32, u32)) {
        if !self.scratch.client.is_empty() {
            let mut bytes = std::mem::take(&mut self.scratch.client);
            if let Some(c) = conn {
                self.clients.send(ctx, c, &bytes, &self.scratch.frames);
            }
            self.scratch.frames.clear();
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

    /// Refuses a connection that has no session: ERROR with SESSION_ID 0 and SEQ 0, then close.
    fn refuse(&mut self, ctx: &mut impl Context<ShardMsg>, conn: Client, code: ErrorCode) {
        let mut out = Vec::with_capacity(64);
        proto::frame::encode_with(&mut out, 0, 0, FrameType::Error, 0, |o| {
            ErrorFrame::encode_parts(code, code.message(), o)
        });
        let written = Written {
            frames: 1,
            errors: vec![code],
        };
        self.clients.send(ctx, conn, &out, &written);
        self.drop_conn(ctx, conn, true);
        debug!(?conn, %code, "connection refused");
    }

    /// Forgets a connection (and closes it, flushing, when `close`).
    fn drop_conn(&mut self, ctx: &mut impl Context<ShardMsg>, conn: Client, close: bool) {
        if close {
            self.ws_goodbye(ctx, conn);
        }
        if let Some(c) = self.clients.conns.remove(&conn) {
            match c.state {
                ConnState::Handshake => self.pending_handshakes -= 1,
                ConnState::Bound(sid) => {
                    if self.attached.get(&sid) == Some(&conn) {
                        self.attached.remove(&sid);
                    }
                }
                ConnState::Relayed => self.relay_conn_gone(conn),
            }
        }
        if close {
            self.clients.close(ctx, conn);
        }
    }

    /// Applies a session's [`Flow`] to its connection and the table.
    fn apply_flow(
        &mut self,
        ctx: &mut impl Context<ShardMsg>,
        sid: u32,
        conn: Option<Client>,
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
        if self.forget_session(sid).is_some() {
            self.roam_ended(sid);
        }
    }

    /// Takes `sid` out of this shard (table, journal, node count, its pod link); its pod key
    /// if it was here. The directory is the caller's business: a session that ended leaves it
    /// (`remove_session`), one that moved or never served here does not.
    fn forget_session(&mut self, sid: u32) -> Option<(u32, u32)> {
        let s = self.table.remove(sid)?;
        let key = (s.tenant(), s.agent());
        self.persist_end(sid);
        self.shared.release_session();
        if let Some(l) = self.links.get_mut(key) {
            l.remove_session(sid);
        }
        Some(key)
    }

    /// Feeds received bytes through the frame decoder. Returns how many bytes were consumed
    /// and whether the connection is still ours to read.
    fn process(
        &mut self,
        ctx: &mut impl Context<ShardMsg>,
        conn: Client,
        bytes: &[u8],
    ) -> (usize, bool) {
        let mut off = 0;
        let mut alive = true;
        let mut frames_in = 0u64;
        // The pod whose messages from this batch's frames wait in the scratch sink.
        let mut pod_batch = None;
        let max = self.shared.cfg.session.max_payload;
        while off < bytes.len() {
            if self
                .clients
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
                        debug!(?conn, %code, "handshake frame refused from its header");
                        self.refuse(ctx, conn, code);
                        alive = false;
                        break;
                    }
                }
            }
            match proto::decode(&bytes[off..], max) {
                Err(e) => {
                    debug!(?conn, error = %e, "broken stream");
                    self.broken(ctx, conn, e.error_code());
                    alive = false;
                    break;
                }
                Ok(Decoded::NeedMore(_)) => break,
                Ok(Decoded::Frame(f, used)) => {
                    frames_in += 1;
                    let rest_from = off;
                    off += used;
                    match self.on_frame(ctx, conn, &f) {
                        Next::Continue => {}
                        Next::Batched(key) => pod_batch = Some(key),
                        Next::Park => break,
                        Next::Relay => {
                            ShardMetrics::inc(&self.m().frames_in, frames_in);
                            if let Some((c, sid, node)) = self.relays.pending.take() {
                                if c == conn {
                                    let first = bytes[rest_from..].to_vec();
                                    self.relay_start(ctx, conn, sid, node, first, false);
                                    return (bytes.len(), true);
                                }
                            }
                            alive = false;
                            break;
                        }
                        Next::Wait => {
                            // ClawRoam: the frame stays unread until what it waits for comes
                            // (a COMMIT, the keeper's answer, the end of a move).
                            ShardMetrics::inc(&self.m().frames_in, frames_in - 1);
                            self.clients.set_reading(ctx, conn, false);
                            return (rest_from, true);
                        }
                        Next::Stop => {
                            alive = false;
                            break;
                        }
                        Next::HandOff(_) if self.quiescing => {
                            // A live upgrade is moving the shards one by one: the session's
                            // may be on its way. The RESUME stays unread here and moves with
                            // this shard's connections; the new process hands it over.
                            ShardMetrics::inc(&self.m().frames_in, frames_in - 1);
                            debug!(?conn, "RESUME for another shard kept for the new process");
                            self.clients.set_reading(ctx, conn, false);
                            return (rest_from, true);
                        }
                        Next::HandOff(shard) => {
                            ShardMetrics::inc(&self.m().frames_in, frames_in);
                            let buffered = bytes[rest_from..].to_vec();
                            self.hand_over(ctx, conn, shard, buffered);
                            return (bytes.len(), false);
                        }
                    }
                }
            }
        }
        ShardMetrics::inc(&self.m().frames_in, frames_in);
        // The batch's counters are journaled before its input goes to the pod: a crash then
        // cannot make the client send input again that the pod already has.
        if self.journal.is_some() && frames_in > 0 {
            if let Some(Conn {
                state: ConnState::Bound(sid),
                ..
            }) = self.clients.conns.get(&conn)
            {
                self.persist_counters(*sid);
            }
        }
        // Pod messages from this batch's frames go out together, in order.
        if let Some(key) = pod_batch {
            if !self.scratch.pod.is_empty() {
                self.flush(ctx, None, key);
            }
            if alive {
                self.pause_if_pod_slow(ctx, conn, key);
            }
        }
        // One coalesced ACK per batch of input for RELIABLE clients.
        if alive {
            if let Some(Conn {
                state: ConnState::Bound(sid),
                ..
            }) = self.clients.conns.get(&conn)
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
    fn broken(&mut self, ctx: &mut impl Context<ShardMsg>, conn: Client, code: ErrorCode) {
        match self.clients.conns.get(&conn).map(|c| c.state) {
            Some(ConnState::Bound(sid)) => {
                let now = self.now(ctx);
                if let Some(s) = self.table.get_mut(sid) {
                    let flow = s.fail(code, now, &self.shared.cfg.session, &mut self.scratch);
                    let key = (s.tenant(), s.agent());
                    self.flush(ctx, Some(conn), key);
                    self.apply_flow(ctx, sid, Some(conn), flow);
                }
            }
            Some(ConnState::Handshake) => self.refuse(ctx, conn, code),
            Some(ConnState::Relayed) | None => {}
        }
    }

    fn on_frame(&mut self, ctx: &mut impl Context<ShardMsg>, conn: Client, f: &Frame<'_>) -> Next {
        let Some(state) = self.clients.conns.get(&conn).map(|c| c.state) else {
            return Next::Stop;
        };
        match state {
            ConnState::Relayed => Next::Stop,
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
                if self.roam.frozen(sid) {
                    return Next::Wait;
                }
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
                    // Client → pod messages (each keeps its DATA boundary) collect in the
                    // scratch sink and go to the link once per batch of input (`process`), in
                    // order; a large batch goes early.
                    if self.scratch.pod.is_empty() {
                        return Next::Continue;
                    }
                    if self.scratch.pod.len() >= POD_BATCH_MAX {
                        self.persist_counters(sid);
                        self.flush(ctx, None, key);
                    }
                    return Next::Batched(key);
                }
                self.flush(ctx, Some(conn), key);
                self.apply_flow(ctx, sid, Some(conn), flow);
                Next::Stop
            }
        }
    }
}

#[derive(PartialEq, Eq)]
enum Next {
    Continue,
    /// Go on; this frame left messages for the pod `(tenant, agent)` in the scratch sink, sent
    /// at the end of the batch.
    Batched((u32, u32)),
    Stop,
    HandOff(usize),
    /// Stop decoding for now (reading is paused); what follows stays buffered.
    Park,
    /// Stop decoding before this frame, which stays buffered (reading is paused) and is
    /// decoded again later (ClawRoam: `roam.rs`).
    Wait,
    /// This RESUME and what follows it go to the node that holds the session: the connection
    /// is relayed from now on (`relays.pending` names where; `relay.rs`).
    Relay,
}

impl ShardHandler {
    /// Client bytes, TLS or not.
    fn on_client_bytes(&mut self, ctx: &mut impl Context<ShardMsg>, conn: Client, data: &[u8]) {
        ShardMetrics::inc(&self.m().bytes_in, data.len() as u64);
        let Some(c) = self.clients.conns.get(&conn) else {
            return;
        };
        if c.tls.is_some() {
            let ws = c.ws.is_some();
            self.on_tls_data(ctx, conn, data, ws);
        } else if c.ws.is_some() {
            self.on_ws_bytes(ctx, conn, data);
        } else {
            self.on_plaintext(ctx, conn, data);
        }
    }
}

impl shards::Handler for ShardHandler {
    type Msg = ShardMsg;

    fn on_start(&mut self, ctx: &mut impl Context<ShardMsg>) {
        if self.moved.is_some() {
            self.adopt_moved(ctx);
        } else {
            self.restore_sessions(ctx);
        }
        let d = self.now(ctx) + STATS_EVERY_MS;
        self.wheel.insert(d, Key::Stats);
        self.schedule(ctx, d);
        self.publish_gauges();
        self.shared
            .metrics
            .ready_shards
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    fn on_accept(&mut self, ctx: &mut impl Context<ShardMsg>, conn: ConnId, peer: SocketAddr) {
        if self.export_late_accept(ctx, conn, peer) {
            return;
        }
        if self.exported_done {
            // Cannot happen (the export waits for `on_accept_stopped`); never served here.
            ctx.abort(conn);
            return;
        }
        let client = Client::Tcp(conn);
        if !self.admit(ctx, client, self.shared.tls.is_none()) {
            return;
        }
        let accepted_us = self.clock.us(ctx.now());
        if !self.limiter.allow_connection(peer.ip(), accepted_us / 1000) {
            if self.shared.tls.is_some() {
                ctx.abort(conn); // no frame can be sent before the TLS handshake
            } else {
                self.refuse(ctx, client, ErrorCode::RateLimited);
            }
            return;
        }
        let Some(tls) = self.start_tls(ctx, conn) else {
            return;
        };
        self.client_opened(ctx, client, peer, tls, accepted_us, false);
    }

    fn on_accept_at(
        &mut self,
        ctx: &mut impl Context<ShardMsg>,
        conn: ConnId,
        peer: SocketAddr,
        listener: usize,
    ) {
        // Listener 1 is the WebSocket port (the only extra listener).
        if listener == 1 && !self.exported_done {
            self.ws_accept(ctx, conn, peer);
        } else {
            shards::Handler::on_accept(self, ctx, conn, peer);
        }
    }

    fn on_data(&mut self, ctx: &mut impl Context<ShardMsg>, conn: ConnId, data: &[u8]) {
        // Client connections first (the common case; a cheap lookup): a connection is never
        // both a client and a pod link.
        if self.clients.conns.contains_key(&Client::Tcp(conn)) {
            self.on_client_bytes(ctx, Client::Tcp(conn), data);
        } else if let Some(key) = self.links.key_of(conn) {
            self.on_link_data(ctx, conn, key, data);
        }
    }

    fn on_datagram(&mut self, ctx: &mut impl Context<ShardMsg>, from: SocketAddr, data: &[u8]) {
        self.datagram_in(ctx, from, data);
    }

    fn on_closed(
        &mut self,
        ctx: &mut impl Context<ShardMsg>,
        conn: ConnId,
        err: Option<std::io::Error>,
    ) {
        if let Some(key) = self.links.key_of(conn) {
            debug!(?key, error = ?err, "pod link closed");
            self.link_down(ctx, key);
        } else {
            debug!(?conn, error = ?err, "connection closed by peer");
            self.conn_lost(ctx, Client::Tcp(conn), false);
        }
    }

    fn on_connected(
        &mut self,
        ctx: &mut impl Context<ShardMsg>,
        conn: ConnId,
        res: std::io::Result<()>,
    ) {
        self.link_connected(ctx, conn, res);
    }

    fn on_writable(&mut self, ctx: &mut impl Context<ShardMsg>, conn: ConnId) {
        match self.links.key_of(conn) {
            Some(key) => self.link_writable(ctx, key),
            None => self.client_writable(ctx, Client::Tcp(conn)),
        }
    }

    fn on_message(&mut self, ctx: &mut impl Context<ShardMsg>, msg: ShardMsg) {
        match msg {
            ShardMsg::PodAdded(t, a) => self.pod_added(ctx, (t, a)),
            ShardMsg::PodRemoved(t, a) => self.pod_removed(ctx, (t, a)),
            ShardMsg::Resume { .. } | ShardMsg::Moved => {}
            ShardMsg::Quiesce(reply) => {
                self.quiescing = true;
                if self.accept_stopped_seen {
                    let _ = reply.send(self.index);
                } else {
                    self.quiesce_reply = Some(reply);
                    ctx.stop_accepting();
                }
            }
            ShardMsg::Export(reply) => self.export_all(ctx, reply),
            ShardMsg::Release => self.release_kept(ctx),
            ShardMsg::TakeOver(restore, done) => {
                self.take_over(ctx, *restore);
                let _ = done.send(self.index);
            }
            ShardMsg::Serve => ctx.start_accepting(),
            ShardMsg::RoamOut {
                sid,
                to,
                force,
                reply,
            } => self.roam_out(ctx, sid, to, force, reply),
            ShardMsg::Peer { from, msg } => self.on_peer(ctx, from, msg),
            ShardMsg::RoamClaimed { sid, epoch, result } => {
                self.roam_claimed(ctx, sid, epoch, result)
            }
            ShardMsg::Located { sid, answer } => self.on_located(ctx, sid, answer),
            ShardMsg::Sessions(reply) => {
                let _ = reply.send(self.session_rows());
            }
            ShardMsg::Datagram { from, bytes } => self.quic_datagram(ctx, from, &bytes),
            relay => self.on_relay(ctx, relay),
        }
    }

    fn on_adopt(
        &mut self,
        ctx: &mut impl Context<ShardMsg>,
        conn: ConnId,
        peer: SocketAddr,
        unread: Vec<u8>,
        msg: ShardMsg,
    ) {
        if self.awaiting {
            // A RESUME another shard of this (new) process passed on before this shard's part
            // of the hand-over arrived: served once it has.
            self.queued_adopts.push((conn, peer, unread, msg));
            return;
        }
        self.adopt(ctx, conn, peer, unread, msg);
    }

    fn on_exported(
        &mut self,
        _ctx: &mut impl Context<ShardMsg>,
        conn: ConnId,
        fd: std::os::fd::OwnedFd,
        unread: Vec<u8>,
        out: Vec<u8>,
        _msg: ShardMsg,
    ) {
        self.exported(conn, fd, unread, out);
    }

    fn on_accept_stopped(&mut self, _ctx: &mut impl Context<ShardMsg>) {
        self.accept_stopped_seen = true;
        if let Some(reply) = self.quiesce_reply.take() {
            let _ = reply.send(self.index);
        }
        self.accept_stopped();
    }

    fn on_tick(&mut self, ctx: &mut impl Context<ShardMsg>, _now: Instant) {
        self.on_timers(ctx);
    }

    /// The QUIC endpoint's work of the whole turn (events, datagrams, timers), once.
    fn on_turn_end(&mut self, ctx: &mut impl Context<ShardMsg>) {
        self.quic_settle(ctx);
        self.maybe_compact(ctx);
    }

    fn on_shutdown(&mut self, ctx: &mut impl Context<ShardMsg>) {
        self.shared
            .metrics
            .ready_shards
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        // With a state dir the sessions outlive the process: the pods are not told anything
        // (their links just close; an agent keeps its sessions for the daemon's return) and
        // the journal already holds every session.
        let ids: Vec<u32> = if self.journal.is_some() {
            Vec::new()
        } else {
            self.table.ids_iter().collect()
        };
        if self.journal.is_some() {
            // Input held for pods that are away goes to the next daemon with the sessions.
            for key in self.links.keys() {
                let held = self
                    .links
                    .get(key)
                    .map(|l| l.held().to_vec())
                    .unwrap_or_default();
                if !held.is_empty() {
                    self.persist_held(key, &held);
                }
            }
            info!(
                sessions = self.table.len(),
                "sessions kept in the state dir for the next clawtermd"
            );
        }
        for sid in ids {
            if let Some(s) = self.table.get_mut(sid) {
                s.close(CloseReason::Normal, &mut self.scratch);
                let key = (s.tenant(), s.agent());
                self.flush(ctx, None, key);
            }
            self.remove_session(sid);
        }
        let conns: Vec<Client> = self.clients.conns.keys().copied().collect();
        for c in conns {
            self.drop_conn(ctx, c, true);
        }
        for key in self.links.keys() {
            if let Some(l) = self.links.remove(key) {
                ctx.close(l.conn());
            }
        }
        if let Some(q) = self.clients.quic.as_mut() {
            q.close_all(ctx.now());
        }
        self.quic_settle(ctx);
        info!("shard stopped");
    }
}
