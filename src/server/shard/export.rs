//! A shard's part in a live upgrade (see [`crate::upgrade`]): freezing and handing everything
//! over in the old process, taking it in at start-up in the new one.

use super::{Client, ConnState, ShardHandler, ShardMsg};
use crate::session::{Session, State};
use crate::state::wall_ms;
use crate::upgrade::{MovedConn, MovedLink, ShardExport};
use shards::{ConnId, Context};
use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use tracing::{debug, info, warn};

/// A shard handing over: what it collected, and the exports the runtime has not finished.
pub(super) struct Exporting {
    reply: crossbeam_channel::Sender<ShardExport>,
    out: ShardExport,
    /// Runtime exports in flight: conn id → what the shard knows of it.
    waiting: BTreeMap<(u32, u32), Pending>,
    /// The runtime let go of the listener (`on_accept_stopped`): no connection accepted
    /// by this shard can come after what is collected.
    accept_stopped: bool,
}

enum Pending {
    Client {
        sid: u32,
        peer: String,
        inbuf: Vec<u8>,
    },
    Link {
        key: (u32, u32),
        hello_seen: bool,
        inbuf: Vec<u8>,
        unsent: Vec<u8>,
    },
}

fn cid(c: ConnId) -> (u32, u32) {
    (c.index(), c.generation())
}

impl ShardHandler {
    /// Freezes the shard and hands everything over: sessions as records, plaintext client
    /// connections and connected pod links as sockets (once the runtime has let go of them).
    /// TLS and QUIC connections stay, unbound, until [`ShardHandler::release_kept`].
    pub(super) fn export_all(
        &mut self,
        ctx: &mut impl Context<ShardMsg>,
        reply: crossbeam_channel::Sender<ShardExport>,
    ) {
        ctx.stop_accepting();
        let now = self.now(ctx);
        let wall = wall_ms();
        let mut out = ShardExport {
            shard: self.index,
            ..ShardExport::default()
        };
        // The journal is the new process's from now on.
        self.journal = None;
        for s in self.table.iter() {
            out.sessions.push(s.to_record(now, wall));
        }
        let mut waiting = BTreeMap::new();
        let conns: Vec<Client> = self.clients.conns.keys().copied().collect();
        for c in conns {
            let Some(conn) = self.clients.conns.get_mut(&c) else {
                continue;
            };
            match c {
                Client::Tcp(id)
                    if conn.tls.is_none()
                        && conn.ws.is_none()
                        && conn.state != ConnState::Relayed =>
                {
                    let sid = match conn.state {
                        ConnState::Bound(s) => s,
                        ConnState::Handshake | ConnState::Relayed => 0,
                    };
                    let pending = Pending::Client {
                        sid,
                        peer: conn.peer.to_string(),
                        inbuf: std::mem::take(&mut conn.inbuf),
                    };
                    self.clients.conns.remove(&c);
                    // A connection that is already gone (its close not yet seen) does not
                    // move: its session is suspended in the new process.
                    if ctx.export(id, ShardMsg::Moved) {
                        waiting.insert(cid(id), pending);
                    }
                }
                _ => {
                    // Cannot move as it is (TLS, QUIC): kept, bound to nothing, until the new
                    // process serves; its client then RESUMEs there.
                    if conn.state != ConnState::Handshake {
                        conn.state = ConnState::Handshake;
                        self.pending_handshakes += 1;
                    }
                    out.kept += 1;
                }
            }
        }
        for key in self.links.keys() {
            let Some(l) = self.links.get_mut(key) else {
                continue;
            };
            if l.is_up() {
                let conn = l.conn();
                let (hello_seen, inbuf, unsent) = l.take_for_export();
                if ctx.export(conn, ShardMsg::Moved) {
                    waiting.insert(
                        cid(conn),
                        Pending::Link {
                            key,
                            hello_seen,
                            inbuf,
                            unsent,
                        },
                    );
                } else if !unsent.is_empty() {
                    // The link broke in this very turn: its sessions are restored as lost in
                    // the new process; what was held for the pod goes with them.
                    out.held.insert(key, unsent);
                }
            } else if let Some(l) = self.links.get(key) {
                // Connecting or lost: the new process reconnects and REOPENs its sessions, then
                // sends the input held for the pod meanwhile.
                let held = l.held().to_vec();
                if !held.is_empty() {
                    out.held.insert(key, held);
                }
                ctx.abort(l.conn());
            }
            self.links.remove(key);
        }
        // Nothing of the sessions stays here: no timer, no output, no CLOSE to a pod.
        let sids: Vec<u32> = self.table.ids_iter().collect();
        for sid in sids {
            self.table.remove(sid);
            self.shared.release_session();
        }
        self.attached.clear();
        info!(
            sessions = out.sessions.len(),
            connections = waiting.len(),
            kept = out.kept,
            "shard frozen for the upgrade"
        );
        self.exporting = Some(Exporting {
            reply,
            out,
            waiting,
            accept_stopped: self.accept_stopped_seen,
        });
        self.maybe_finish_export();
    }

    /// A connection the kernel had accepted for this shard before its listener went to the new
    /// process: it moves too, as it is (nothing was read from it), so its client notices
    /// nothing. TLS included: the new process does its handshake. `false` when not exporting.
    pub(super) fn export_late_accept(
        &mut self,
        ctx: &mut impl Context<ShardMsg>,
        conn: ConnId,
        peer: std::net::SocketAddr,
    ) -> bool {
        let Some(x) = self.exporting.as_mut() else {
            return false;
        };
        if ctx.export(conn, ShardMsg::Moved) {
            x.waiting.insert(
                cid(conn),
                Pending::Client {
                    sid: 0,
                    peer: peer.to_string(),
                    inbuf: Vec::new(),
                },
            );
        }
        true
    }

    /// The runtime let go of the listener: what is collected is all there is.
    pub(super) fn accept_stopped(&mut self) {
        if let Some(x) = self.exporting.as_mut() {
            x.accept_stopped = true;
        }
        self.maybe_finish_export();
    }

    /// The runtime let go of an exported connection.
    pub(super) fn exported(&mut self, conn: ConnId, fd: OwnedFd, unread: Vec<u8>, unsent: Vec<u8>) {
        let Some(x) = self.exporting.as_mut() else {
            return;
        };
        match x.waiting.remove(&cid(conn)) {
            Some(Pending::Client {
                sid,
                peer,
                mut inbuf,
            }) => {
                inbuf.extend_from_slice(&unread);
                x.out.conns.push(MovedConn {
                    sid,
                    peer,
                    fd,
                    unread: inbuf,
                    unsent,
                });
            }
            Some(Pending::Link {
                key,
                hello_seen,
                mut inbuf,
                unsent: mut held,
            }) => {
                inbuf.extend_from_slice(&unread);
                // The runtime's queue went out first; what the link held comes after.
                let mut all = unsent;
                all.append(&mut held);
                x.out.links.push(MovedLink {
                    key,
                    hello_seen,
                    fd,
                    unread: inbuf,
                    unsent: all,
                });
            }
            None => debug!(?conn, "export of an unknown connection"),
        }
        self.maybe_finish_export();
    }

    fn maybe_finish_export(&mut self) {
        if self
            .exporting
            .as_ref()
            .is_some_and(|x| x.waiting.is_empty() && x.accept_stopped)
        {
            if let Some(x) = self.exporting.take() {
                if x.reply.send(x.out).is_err() {
                    warn!("the upgrade ended before this shard's hand-over was taken");
                }
                self.exported_done = true;
            }
        }
    }

    /// The new process serves: what could not move is closed (its clients RESUME there).
    pub(super) fn release_kept(&mut self, ctx: &mut impl Context<ShardMsg>) {
        // Closed at once: they carry nothing any more (their sessions moved), and this process
        // is about to exit, so there is no point in lingering for each client's EOF.
        let conns: Vec<Client> = self.clients.conns.keys().copied().collect();
        for c in conns {
            self.drop_conn(ctx, c, false);
            self.clients.abort(ctx, c);
        }
        if let Some(q) = self.clients.quic.as_mut() {
            q.close_all(ctx.now());
        }
        self.quic_settle(ctx);
    }

    /// In the new process, once the shard runs: its part of the hand-over arrived.
    pub(super) fn take_over(&mut self, ctx: &mut impl Context<ShardMsg>, r: super::Restore) {
        self.journal = r.journal;
        self.restore_records = r.records;
        self.restore_held = r.held;
        self.moved = Some(r.moved.unwrap_or_default());
        self.awaiting = false;
        self.adopt_moved(ctx);
        for (conn, peer, unread, msg) in std::mem::take(&mut self.queued_adopts) {
            self.adopt(ctx, conn, peer, unread, msg);
        }
        self.publish_gauges();
    }

    /// In the new process: the connections and links the old one handed over are
    /// taken in, bound to their sessions as they were (their clients and pods notice nothing);
    /// sessions that lost their connection (TLS, QUIC) are suspended, and those whose link did
    /// not come are restored as after a restart (REOPEN once the pod's link is up).
    pub(super) fn adopt_moved(&mut self, ctx: &mut impl Context<ShardMsg>) {
        let Some(moved) = self.moved.take() else {
            return;
        };
        let now = self.now(ctx);
        let wall = wall_ms();
        let cfg = self.shared.cfg.session.clone();
        let mut sessions = Vec::new();
        for rec in std::mem::take(&mut self.restore_records) {
            match Session::from_record(&rec, now, wall) {
                Ok((s, _)) => sessions.push(s),
                Err(e) => {
                    tracing::error!(error = %e, "handed-over session record unreadable; session lost");
                    crate::server::metrics::ShardMetrics::inc(&self.m().state_errors, 1);
                }
            }
        }
        let linked: std::collections::HashSet<(u32, u32)> =
            moved.links.iter().map(|l| l.key).collect();
        let mut lost: BTreeMap<(u32, u32), Vec<u32>> = BTreeMap::new();
        for mut s in sessions {
            let sid = s.id();
            let key = (s.tenant(), s.agent());
            if !linked.contains(&key) && !s.agent_closed() {
                // Its link did not come (connecting or lost in the old process): a new one
                // starts unpaused, with REOPEN. (A session its agent closed needs no pod.)
                s.clear_pod_flow();
                lost.entry(key).or_default().push(sid);
            }
            self.shared
                .sessions
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if self.table.insert(s).is_none() {
                self.shared.release_session();
            }
        }
        // Links and connections are bound first; what they had received is processed only
        // once every one of them is in place (pod output for a session whose connection is not
        // bound yet would go nowhere).
        let mut link_unread = Vec::new();
        for l in moved.links {
            let conn = ctx.adopt_fd(l.fd, &l.unsent);
            let sids: Vec<u32> = self
                .table
                .iter()
                .filter(|s| (s.tenant(), s.agent()) == l.key)
                .map(|s| s.id())
                .collect();
            self.links.adopt(l.key, conn, l.hello_seen, sids);
            if !l.unread.is_empty() {
                link_unread.push((conn, l.key, l.unread));
            }
        }
        for (key, sids) in lost {
            let action = self
                .links
                .restore(key, sids, now, self.shared.cfg.agent_grace_ms);
            if let Some(h) = self.restore_held.remove(&key) {
                self.links.restore_held(key, &h);
            }
            self.apply_link_actions(ctx, key, vec![action]);
            if self.shared.pod_present(key.0, key.1) {
                self.pod_added(ctx, key);
            }
        }
        let mut conns = 0usize;
        let mut conn_unread = Vec::new();
        for c in moved.conns {
            let peer = c
                .peer
                .parse()
                .unwrap_or_else(|_| std::net::SocketAddr::from(([0, 0, 0, 0], 0)));
            let id = ctx.adopt_fd(c.fd, &c.unsent);
            let client = Client::Tcp(id);
            let accepted_us = self.clock.us(ctx.now());
            // With TLS only connections accepted as the listener went over move (nothing read
            // from them yet): their handshake happens here.
            let tls = if c.sid == 0 {
                match self.start_tls(ctx, id) {
                    Some(tls) => tls,
                    None => continue,
                }
            } else {
                None
            };
            self.client_opened(ctx, client, peer, tls, accepted_us, true);
            if c.sid != 0
                && self
                    .table
                    .get(c.sid)
                    .is_some_and(|s| s.state() == State::Attached)
            {
                if let Some(cs) = self.clients.conns.get_mut(&client) {
                    cs.state = ConnState::Bound(c.sid);
                }
                self.pending_handshakes -= 1;
                self.attached.insert(c.sid, client);
                if self.table.get(c.sid).is_some_and(|s| s.input_paused()) {
                    self.clients.set_reading(ctx, client, false);
                }
            } else if c.sid != 0 {
                // Its session is not here attached: nothing sensible to continue.
                self.drop_conn(ctx, client, true);
                continue;
            }
            conns += 1;
            if !c.unread.is_empty() {
                conn_unread.push((client, c.unread));
            }
        }
        for (conn, key, bytes) in link_unread {
            self.on_link_data(ctx, conn, key, &bytes);
        }
        for (client, bytes) in conn_unread {
            self.on_plaintext(ctx, client, &bytes);
        }
        // Sessions attached in the old process through a connection that could not move:
        // suspended now (the pod is told), their clients RESUME.
        let ids: Vec<u32> = self.table.ids_iter().collect();
        for sid in ids {
            let Some(s) = self.table.get_mut(sid) else {
                continue;
            };
            if s.state() == State::Attached && !self.attached.contains_key(&sid) {
                s.detach(now, &cfg, &mut self.scratch);
                let key = (s.tenant(), s.agent());
                self.flush(ctx, None, key);
            }
            self.arm(ctx, sid);
        }
        info!(
            sessions = self.table.len(),
            connections = conns,
            links = linked.len(),
            "took over from the previous clawtermd"
        );
    }
}
