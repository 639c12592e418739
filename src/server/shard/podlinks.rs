//! The pod-link side of a shard: the link to each agent pod it talks to, from connect and
//! HELLO through loss (sessions wait `--agent-grace`, input held), reconnect with REOPEN, to
//! the pod gone for good (AGENT_GONE); and the back-pressure between a pod link and the clients
//! that write to it.

use super::super::metrics::ShardMetrics;
use super::{Client, Conn, ConnState, Key, Next, ShardHandler, ShardMsg};
use crate::podlink::{self, Msg as PodMsg};
use crate::pods::links::{self as pods, LinkAction, LinkTimer};
use crate::proto::ErrorCode;
use crate::session::{Flow, State};
use shards::{ConnId, Context};
use tracing::{debug, info, warn};

impl ShardHandler {
    pub(super) fn on_link_data(
        &mut self,
        ctx: &mut impl Context<ShardMsg>,
        link_conn: ConnId,
        key: (u32, u32),
        data: &[u8],
    ) {
        let mut buf = match self.links.get_mut(key) {
            Some(l) => l.take_input(),
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
        let mut hello_seen = self.links.get(key).is_some_and(|l| l.hello_seen());
        while off < bytes.len() {
            match podlink::decode(&bytes[off..]) {
                Err(e) => {
                    warn!(?key, error = %e, "pod link broken");
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
                    if !self.on_pod_msg(ctx, key, session_id, msg, &mut hello_seen) {
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
            l.keep_input(rest);
        }
    }

    /// The link to a pod broke (EOF, error, broken framing) or its socket disappeared: its
    /// sessions wait for the pod for `--agent-grace`, their input held; attached clients stay.
    /// [`Links::lost`](crate::pods::links::Links::lost) decides; this carries it out.
    pub(super) fn link_down(&mut self, ctx: &mut impl Context<ShardMsg>, key: (u32, u32)) {
        let grace = self.shared.cfg.agent_grace_ms;
        let now = self.now(ctx);
        let present = self.shared.pod_present(key.0, key.1);
        let actions = self.links.lost(key, now, grace, present);
        // Only a first loss with sessions waiting releases their input.
        for a in &actions {
            if let LinkAction::ReleaseInput(sids) = a {
                info!(
                    tenant = key.0,
                    agent = key.1,
                    sessions = sids.len(),
                    grace_ms = grace,
                    "pod lost; sessions wait for it"
                );
            }
        }
        self.apply_link_actions(ctx, key, actions);
    }

    /// Carries out what [`Links`](crate::pods::links::Links) decided for the link to `key`.
    pub(super) fn apply_link_actions(
        &mut self,
        ctx: &mut impl Context<ShardMsg>,
        key: (u32, u32),
        actions: Vec<LinkAction>,
    ) {
        for a in actions {
            match a {
                LinkAction::Arm(at, timer) => {
                    let k = match timer {
                        LinkTimer::Grace => Key::Grace(key),
                        LinkTimer::Retry => Key::Retry(key),
                    };
                    self.wheel.insert(at, k);
                    self.schedule(ctx, at);
                }
                LinkAction::Abort(conn) => ctx.abort(conn),
                LinkAction::AgentGone(sids) => self.agent_gone(ctx, key, sids),
                LinkAction::ReleaseInput(sids) => {
                    // The pod that held some sessions' input is gone: its PAUSEs went with it.
                    // Input is now held by the link (bounded) until the pod is back.
                    for sid in sids {
                        if self
                            .table
                            .get_mut(sid)
                            .is_some_and(|s| s.on_pod_input(false))
                        {
                            if let Some(c) = self.attached.get(&sid).copied() {
                                self.set_client_reading(ctx, c, key, true);
                            }
                        }
                    }
                }
            }
        }
    }

    /// A pod socket appeared: a lost link to it reconnects, with HELLO, a REOPEN for each of
    /// its sessions, then the input held meanwhile.
    pub(super) fn pod_added(&mut self, ctx: &mut impl Context<ShardMsg>, key: (u32, u32)) {
        if !self.links.wants_reconnect(key) {
            return; // not lost, or a reconnect is already in flight
        }
        let Some(l) = self.links.get(key) else { return };
        let path = pods::socket_path(&self.shared.cfg.socket_dir, key.0, key.1);
        let conn = match ctx.connect_unix(&path) {
            Ok(c) => c,
            Err(e) => {
                debug!(path = %path.display(), error = %e, "pod not reachable yet");
                let now = self.now(ctx);
                let present = self.shared.pod_present(key.0, key.1);
                let retry = self.links.reconnect_failed(key, now, present);
                self.apply_link_actions(ctx, key, retry.into_iter().collect());
                return;
            }
        };
        let mut prefix = Vec::new();
        let name = format!("clawtermd shard {}", self.index);
        podlink::encode(
            &mut prefix,
            0,
            &PodMsg::Hello {
                version: podlink::codec::VERSION_MIGRATE,
                name: &name,
            },
        );
        let sessions: Vec<u32> = l.sessions().iter().copied().collect();
        for sid in sessions {
            let Some(s) = self.table.get(sid) else {
                continue;
            };
            let peer = self
                .attached
                .get(&sid)
                .and_then(|c| self.clients.conns.get(c))
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
            tenant = key.0,
            agent = key.1,
            "pod back; reopening its sessions"
        );
        self.links.reconnect(key, conn, prefix);
    }

    /// The grace period of a lost pod ran out.
    pub(super) fn grace_expired(&mut self, ctx: &mut impl Context<ShardMsg>, key: (u32, u32)) {
        let now = self.now(ctx);
        let actions = self
            .links
            .grace_due(key, now, self.shared.cfg.agent_grace_ms);
        self.apply_link_actions(ctx, key, actions);
    }

    /// The pod is gone for good: its sessions on this shard end with AGENT_GONE, after the
    /// output the pod already produced.
    fn agent_gone(&mut self, ctx: &mut impl Context<ShardMsg>, key: (u32, u32), sids: Vec<u32>) {
        info!(
            tenant = key.0,
            agent = key.1,
            sessions = sids.len(),
            "pod gone for good"
        );
        let now = self.now(ctx);
        for sid in sids {
            let conn = self.attached.get(&sid).copied();
            let Some(s) = self.table.get_mut(sid) else {
                continue;
            };
            let flow = s.on_agent_gone(now, &mut self.scratch);
            self.persist_meta(ctx, sid);
            self.scratch.pod.clear();
            self.flush(ctx, conn, key);
            self.apply_flow(ctx, sid, conn, flow);
        }
    }

    /// The link to (tenant, agent), opened if this shard has none yet.
    pub(super) fn ensure_link(
        &mut self,
        ctx: &mut impl Context<ShardMsg>,
        key: (u32, u32),
    ) -> bool {
        if let Some(l) = self.links.get(key) {
            // A lost pod takes no new sessions until it is back.
            return !l.is_lost();
        }
        let path = pods::socket_path(&self.shared.cfg.socket_dir, key.0, key.1);
        match ctx.connect_unix(&path) {
            Ok(conn) => {
                let name = format!("clawtermd shard {}", self.index);
                self.links.insert(key, conn, &name);
                true
            }
            Err(e) => {
                warn!(path = %path.display(), error = %e, "cannot connect to agent pod");
                false
            }
        }
    }

    /// Pod-link bytes for the pod `key`: sent when its link is up, held by the link otherwise.
    pub(super) fn link_send(
        &mut self,
        ctx: &mut impl Context<ShardMsg>,
        key: (u32, u32),
        bytes: &[u8],
    ) {
        match self.links.get_mut(key) {
            Some(l) => {
                if let Some(conn) = l.route(bytes) {
                    ctx.send(conn, bytes);
                }
            }
            None => debug!(?key, "no link for pod message; dropped"),
        }
    }

    /// A pod that reads slower than this client writes: stop reading the client until the
    /// link drains, so the link's queue stays bounded.
    pub(super) fn pause_if_pod_slow(
        &mut self,
        ctx: &mut impl Context<ShardMsg>,
        conn: Client,
        key: (u32, u32),
    ) {
        let mut pause = false;
        if let Some(l) = self.links.get_mut(key) {
            if l.over_limit(l.is_up() && ctx.is_backpressured(l.conn())) {
                l.pause_reader(conn);
                pause = true;
            }
        }
        if pause {
            self.clients.set_reading(ctx, conn, false);
        }
    }

    /// Reading resumes on the clients a link had paused.
    pub(super) fn resume_readers(
        &mut self,
        ctx: &mut impl Context<ShardMsg>,
        readers: Vec<Client>,
    ) {
        for c in readers {
            let held_by_pod = match self.clients.conns.get(&c) {
                None => continue,
                Some(Conn {
                    state: ConnState::Bound(sid),
                    ..
                }) => self.table.get(*sid).is_some_and(|s| s.input_paused()),
                Some(_) => false,
            };
            if !held_by_pod {
                self.clients.set_reading(ctx, c, true);
            }
        }
    }

    /// One message from a pod. Returns false when the link must be broken.
    pub(super) fn on_pod_msg(
        &mut self,
        ctx: &mut impl Context<ShardMsg>,
        key: (u32, u32),
        sid: u32,
        msg: PodMsg<'_>,
        hello_seen: &mut bool,
    ) -> bool {
        if !*hello_seen {
            let Some(l) = self.links.get_mut(key) else {
                return false;
            };
            if let PodMsg::Hello { version, name } = msg {
                if !(podlink::codec::VERSION..=podlink::codec::VERSION_MIGRATE).contains(&version) {
                    warn!(
                        ?key,
                        version,
                        name,
                        "pod HELLO has unsupported version {version} (this server speaks {} and {}); breaking the link",
                        podlink::codec::VERSION,
                        podlink::codec::VERSION_MIGRATE
                    );
                    return false;
                }
                l.saw_hello();
                l.set_pod_version(version);
                *hello_seen = true;
                debug!(?key, version, name, "pod HELLO");
                return true;
            }
            warn!(?key, "pod sent {} before HELLO", msg.ty().name());
            return false;
        }
        if let PodMsg::State(chunk) = msg {
            // ClawRoam: a session being exported (`roam.rs`); anything else is ignored.
            if !self.roam_state(ctx, sid, chunk) {
                debug!(
                    ?key,
                    session = sid,
                    "STATE for a session not being exported; ignored"
                );
            }
            return true;
        }
        let now = self.now(ctx);
        let cfg = &self.shared.cfg.session;
        let Some(s) = self.table.get_mut(sid) else {
            return true; // a session that ended meanwhile
        };
        if (s.tenant(), s.agent()) != key {
            warn!(
                ?key,
                session = sid,
                "pod sent a message for another pod's session"
            );
            return true;
        }
        let conn = self.attached.get(&sid).copied();
        let unacked = s.unacknowledged();
        let mut journal_output = None;
        let mut journal_meta = false;
        let flow = match msg {
            PodMsg::Data(d) => {
                let first = s.next_seq();
                s.on_agent_data(d, now, cfg, &mut self.scratch);
                if s.next_seq() != first {
                    journal_output = Some((first, d));
                }
                Flow::Continue
            }
            PodMsg::Close(_) => {
                journal_meta = true;
                s.on_agent_close(now, &mut self.scratch)
            }
            PodMsg::Pause | PodMsg::Continue => {
                let pause = matches!(msg, PodMsg::Pause);
                if s.on_pod_input(pause) {
                    if pause {
                        ShardMetrics::inc(&self.shared.metrics.shards[self.index].input_pauses, 1);
                    }
                    if let Some(c) = conn {
                        self.set_client_reading(ctx, c, key, !pause);
                    }
                }
                return true;
            }
            _ => Flow::Continue,
        };
        // Output moves deadlines later, except the delivery check a ring pause files: only then
        // (or when the session ended, or has no connection) does the timer need filing again.
        let earlier = s
            .delivery_check()
            .is_some_and(|d| s.armed == 0 || d < s.armed);
        // Journaled before it is written to the client.
        if let Some((first, d)) = journal_output {
            self.persist_output(sid, first, d);
        }
        if journal_meta {
            self.persist_meta(ctx, sid);
        }
        self.flush(ctx, conn, key);
        if let (Some(c), true) = (conn, unacked) {
            self.check_backlog(ctx, sid, c, key);
        }
        if flow != Flow::Continue || conn.is_none() || earlier {
            self.apply_flow(ctx, sid, conn, flow);
        }
        true
    }

    /// Outcome of a pod link's connect: HELLO and what waited go out, and the CONNECTs that
    /// waited for the link open their sessions; a failed connect refuses them (NO_AGENT).
    pub(super) fn link_connected(
        &mut self,
        ctx: &mut impl Context<ShardMsg>,
        conn: ConnId,
        res: std::io::Result<()>,
    ) {
        let Some(key) = self.links.key_of(conn) else {
            return;
        };
        match res {
            Ok(()) => {
                let up = self.links.link_up(key);
                ctx.send(conn, &up.send);
                // What was held for the pod is on its way: the journal holds nothing for it.
                if self.journal.is_some() {
                    self.persist_held(key, &[]);
                }
                let readers = self.links.drained(key, ctx.is_backpressured(conn));
                self.resume_readers(ctx, readers);
                let waiting = up.waiting;
                // CONNECTs that waited for this link now open their sessions.
                for (c, caps) in waiting {
                    if !self
                        .clients
                        .conns
                        .get(&c)
                        .is_some_and(|x| x.state == ConnState::Handshake)
                    {
                        continue;
                    }
                    self.clients.set_reading(ctx, c, true);
                    if self.open_session(ctx, c, key, caps) == Next::Continue {
                        // Frames that came after the CONNECT.
                        let buf = self
                            .clients
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
                let waiting = self.links.connect_failed(key);
                for (c, _) in waiting {
                    if self
                        .clients
                        .conns
                        .get(&c)
                        .is_some_and(|x| x.state == ConnState::Handshake)
                    {
                        self.refuse(ctx, c, ErrorCode::NoAgent);
                    }
                }
                warn!(?key, error = %e, "pod link connect failed");
                self.link_down(ctx, key);
            }
        }
    }

    /// A pod link's queue drained below its low watermark: the clients it paused read again.
    pub(super) fn link_writable(&mut self, ctx: &mut impl Context<ShardMsg>, key: (u32, u32)) {
        let readers = self
            .links
            .get_mut(key)
            .map(|l| l.take_paused_readers())
            .unwrap_or_default();
        self.resume_readers(ctx, readers);
    }

    /// The registry saw the pod's socket disappear: a link that was up goes down (its
    /// sessions wait for the pod, `--agent-grace`).
    pub(super) fn pod_removed(&mut self, ctx: &mut impl Context<ShardMsg>, key: (u32, u32)) {
        if let Some(l) = self.links.get(key) {
            if !l.is_lost() {
                let c = l.conn();
                ctx.close(c);
                self.link_down(ctx, key);
            }
        }
    }
}
