//! The handshake of a client connection: admission (pending-handshake cap), its deadline,
//! CONNECT (checks in the order of PROTOCOL.md §2.1, then a session on this shard once its
//! pod link is up) and RESUME (credentials, take-over of the attached connection, replay; a
//! session of another shard is handed over there).

use super::super::metrics::ShardMetrics;
use super::{Client, Conn, ConnState, Key, Next, ShardHandler, ShardMsg};
use crate::proto::{Connect, ErrorCode, Frame, Resume, CAP_RELIABLE, CAP_ROAM};
use crate::session::{Flow, ResumeFrom, Session, State};
use shards::Context;
use std::net::SocketAddr;
use tracing::{debug, info};

impl ShardHandler {
    /// Whether another connection may start its handshake; refuses it (OVERLOADED where a
    /// frame can be sent) when not.
    pub(super) fn admit(
        &mut self,
        ctx: &mut impl Context<ShardMsg>,
        conn: Client,
        can_send: bool,
    ) -> bool {
        if self.pending_handshakes < self.shared.cfg.max_pending_handshakes {
            return true;
        }
        // §6: a connection limit is OVERLOADED. Nothing can be sent before a TLS handshake,
        // so such a connection is only aborted.
        debug!(?conn, "too many pending handshakes; refused");
        if can_send {
            self.refuse(ctx, conn, ErrorCode::Overloaded);
        } else {
            self.clients.abort(ctx, conn);
        }
        false
    }

    /// A new client connection (an accepted TCP connection, a QUIC stream, or a relayed
    /// stream): it starts in the handshake state with its deadline filed.
    /// The TLS state of a new TCP connection when the server speaks TLS (`Some(None)`
    /// without). `None`: TLS could not start; the connection was aborted.
    pub(super) fn start_tls(
        &self,
        ctx: &mut impl Context<ShardMsg>,
        conn: shards::ConnId,
    ) -> Option<Option<Box<rustls::ServerConnection>>> {
        match &self.shared.tls {
            Some(t) => match t.accept() {
                Ok(c) => Some(Some(Box::new(c))),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot start TLS");
                    ctx.abort(conn);
                    None
                }
            },
            None => Some(None),
        }
    }

    pub(super) fn client_opened(
        &mut self,
        ctx: &mut impl Context<ShardMsg>,
        conn: Client,
        peer: SocketAddr,
        tls: Option<Box<rustls::ServerConnection>>,
        accepted_us: u64,
        adopted: bool,
    ) {
        self.pending_handshakes += 1;
        self.clients.conns.insert(
            conn,
            Conn {
                state: ConnState::Handshake,
                inbuf: Vec::new(),
                peer,
                accepted_us,
                adopted,
                tls,
                ws: None,
            },
        );
        let d = self.now(ctx) + self.shared.cfg.handshake_ms;
        self.wheel.insert(d, Key::Handshake(conn));
        self.schedule(ctx, d);
    }

    pub(super) fn on_connect(
        &mut self,
        ctx: &mut impl Context<ShardMsg>,
        conn: Client,
        f: &Frame<'_>,
    ) -> Next {
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
            if !l.is_up() {
                // The link is still connecting: the CONNECT waits for it, so a pod whose socket
                // exists but refuses us gives NO_AGENT rather than a session with no agent.
                l.wait_for_connect(conn, c.caps);
                self.clients.set_reading(ctx, conn, false);
                return Next::Park;
            }
        }
        self.open_session(ctx, conn, key, c.caps)
    }

    /// The CONNECT passed every check but capacity and the link is up: open the session.
    pub(super) fn open_session(
        &mut self,
        ctx: &mut impl Context<ShardMsg>,
        conn: Client,
        key: (u32, u32),
        caps: u8,
    ) -> Next {
        if !self.shared.reserve_session() {
            self.refuse(ctx, conn, ErrorCode::Overloaded);
            return Next::Stop;
        }
        let now = self.now(ctx);
        let Some(peer) = self.clients.conns.get(&conn).map(|c| c.peer) else {
            return Next::Stop;
        };
        let peer_s = peer.to_string();
        let s = self
            .table
            .create(|id, token| Session::new(id, key.0, key.1, caps, token, now));
        let sid = s.id();
        s.accept(CAP_RELIABLE | CAP_ROAM, &peer_s, now, &mut self.scratch);
        self.persist_meta(ctx, sid);
        self.roam_created(sid);
        if let Some(l) = self.links.get_mut(key) {
            l.add_session(sid);
        }
        if let Some(cs) = self.clients.conns.get_mut(&conn) {
            cs.state = ConnState::Bound(sid);
        }
        self.pending_handshakes -= 1;
        self.attached.insert(sid, conn);
        self.flush(ctx, Some(conn), key);
        self.arm(ctx, sid);
        let now_us = self.clock.us(ctx.now());
        self.m().handshake.observe_us(
            now_us.saturating_sub(
                self.clients
                    .conns
                    .get(&conn)
                    .map_or(now_us, |c| c.accepted_us),
            ),
        );
        debug!(
            session = sid,
            tenant = key.0,
            agent = key.1,
            "session opened"
        );
        Next::Continue
    }

    pub(super) fn on_resume(
        &mut self,
        ctx: &mut impl Context<ShardMsg>,
        conn: Client,
        f: &Frame<'_>,
    ) -> Next {
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
        let shards = self.shared.cfg.shards;
        let owner = match &self.shared.cluster {
            // A session that roamed in keeps its id: its home is in range on every node.
            Some(_) => super::super::cluster::home(sid, shards),
            None => self.table.ids().owner(sid),
        };
        if owner >= shards || sid == 0 {
            self.auth_failed(ctx, conn);
            self.refuse(ctx, conn, ErrorCode::NoSuchSession);
            return Next::Stop;
        }
        if owner != self.index {
            return Next::HandOff(owner);
        }
        if self.shared.cluster.is_some() {
            if self.roam.frozen(sid) && self.table.get(sid).is_some() {
                // Moving (or arriving): the RESUME waits for the move's end.
                self.roam_park(ctx, conn, sid);
                return Next::Wait;
            }
            if self.table.get(sid).is_none() {
                let token = match &r {
                    Resume::Full { token, .. } => Some(*token),
                    Resume::Legacy { .. } => None,
                };
                if let Some(next) = self.roam_resume(ctx, conn, sid, token.as_ref()) {
                    return next;
                }
            }
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
            debug!(session = sid, "session taken over");
        }
        let cfg = &self.shared.cfg.session;
        let Some(s) = self.table.get_mut(sid) else {
            return Next::Stop;
        };
        let flow = s.resume(from, now, cfg, &mut self.scratch);
        let key = (s.tenant(), s.agent());
        let replayed = s.ring().payload_bytes() as u64;
        self.persist_counters(sid);
        let now_us = self.clock.us(ctx.now());
        let (accepted_us, adopted) = self
            .clients
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
        if let Some(cs) = self.clients.conns.get_mut(&conn) {
            cs.state = ConnState::Bound(sid);
        }
        self.pending_handshakes -= 1;
        self.attached.insert(sid, conn);
        self.flush(ctx, Some(conn), key);
        self.apply_flow(ctx, sid, Some(conn), flow);
        if flow != Flow::Continue {
            return Next::Stop;
        }
        if self.table.get(sid).is_some_and(|s| s.input_paused()) {
            // The pod still holds this session's input: what follows waits (POD-LINK.md §4).
            self.clients.set_reading(ctx, conn, false);
            return Next::Park;
        }
        Next::Continue
    }
}
