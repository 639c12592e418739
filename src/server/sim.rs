//! A node in a bottle: every shard's [`ShardHandler`] driven by a simulated runtime
//! ([`shards::sim::SimCtx`]), with client connections that are byte pipes (tests put the sans-IO
//! client core on them) and agent pods that are plain data. No socket carries a byte, no thread
//! runs a shard, the clock moves only when told: a test or a fuzz target plays the network and
//! the kernel, the way quinn-proto's tests drive a connection `Pair`.
//!
//! The pod registry is a detached one ([`Registry::detached`]): [`Sim::add_pod`] and
//! [`Sim::remove_pod`] set what it lists and tell every shard, as the inotify watcher's
//! callback does on a real node; the shards' connects to a pod's socket path are answered by
//! the simulation. Nothing touches the file system.
//!
//! What the simulation keeps exact: each client connection's bytes in order, hand-offs of a
//! connection between shards (output queued before the hand-off reaches the client first),
//! cross-shard messages in posting order, pod links per shard with their HELLO, OPEN, REOPEN,
//! DATA, CLOSE and PAUSE/CONTINUE, connects refused while a pod is away, and timers (a shard's
//! `on_tick` runs when the clock passes the deadline it asked for).

use super::shard::{ShardHandler, ShardMsg};
use super::{ServerConfig, Shared};
use crate::podlink::{self, Msg as PodMsg};
use crate::pods::{PodKey, Registry};
use shards::sim::SimCtx;
use shards::{ConnId, Context, Handler};
use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

/// Rounds of delivery [`Sim::settle`] runs at most before it reports a stall.
const SETTLE_ROUNDS: usize = 10_000;

/// A client connection as the simulation tracks it (it follows its connection across a
/// hand-off to another shard).
#[derive(Debug, Default)]
pub struct SimClient {
    /// Where the connection is: (shard, connection), while open.
    pub at: Option<(usize, ConnId)>,
    /// The peer address it connected from.
    pub peer: Option<SocketAddr>,
    /// Bytes the server sent to it, not yet taken with [`Sim::client_take`].
    pub inbox: Vec<u8>,
}

/// One simulated agent pod: what it received, per session, and how it answers.
#[derive(Debug, Default)]
pub struct SimPod {
    /// Whether its socket takes connections.
    listening: bool,
    path: PathBuf,
    /// Its links: (shard, connection, undecoded input, HELLO answered).
    links: Vec<(usize, ConnId, Vec<u8>)>,
    /// Sessions opened (OPEN), in order.
    pub opened: Vec<u32>,
    /// Sessions re-bound after the link came back (REOPEN), in order.
    pub reopened: Vec<u32>,
    /// Sessions the daemon closed (CLOSE), in order.
    pub closed: Vec<u32>,
    /// Client input per session, concatenated.
    pub input: HashMap<u32, Vec<u8>>,
    /// DETACHED / ATTACHED / PAUSE / CONTINUE seen, per session, in order (their names).
    pub events: HashMap<u32, Vec<&'static str>>,
    /// Echo every DATA back (the reference echo agent).
    pub echo: bool,
}

struct SimShard {
    h: ShardHandler,
    ctx: SimCtx<ShardMsg>,
}

/// A whole node of shards, simulated. See the module documentation.
pub struct Sim {
    /// What the shards share (configuration, metrics, registry, sessions on the node).
    pub shared: Arc<Shared>,
    shards: Vec<SimShard>,
    /// Client connections by handle (index).
    pub clients: Vec<SimClient>,
    /// Pods by (tenant, agent).
    pub pods: HashMap<(u32, u32), SimPod>,
    t0: Instant,
    dir: PathBuf,
    next_port: u16,
}

impl Sim {
    /// A node with `cfg.shards` shards. TLS and QUIC are not simulated (`cfg.tls`,
    /// `cfg.quic_port` are ignored).
    pub fn new(cfg: ServerConfig) -> Sim {
        Sim::with_restores(cfg, Vec::new())
    }

    /// A node whose shards start with `restores` (sessions restored or handed over).
    fn with_restores(mut cfg: ServerConfig, mut restores: Vec<super::shard::Restore>) -> Sim {
        let dir = cfg.socket_dir.clone();
        cfg.tls = None;
        cfg.quic_port = None;
        cfg.shards = cfg.shards.max(1);
        let registry = Registry::detached(&dir);
        let shard_count = cfg.shards;
        let shared = Arc::new(Shared {
            upgraded: Default::default(),
            upgrade_failed: Default::default(),
            cfg,
            tokens: RwLock::new(None),
            sessions: AtomicUsize::new(0),
            registry,
            metrics: Arc::new(super::metrics::Metrics::new(shard_count)),
            tls: None,
            quic: None,
            cluster: None,
            ws: None,
        });
        let t0 = Instant::now();
        let mut shards = Vec::with_capacity(shard_count);
        for i in 0..shard_count {
            let mut s = SimShard {
                h: ShardHandler::new(
                    i,
                    shared.clone(),
                    if restores.len() > i {
                        std::mem::take(&mut restores[i])
                    } else {
                        Default::default()
                    },
                ),
                ctx: SimCtx::new(i, shard_count, t0),
            };
            s.h.on_start(&mut s.ctx);
            shards.push(s);
        }
        Sim {
            shared,
            shards,
            clients: Vec::new(),
            pods: HashMap::new(),
            t0,
            dir,
            next_port: 10_000,
        }
    }

    /// Milliseconds since the simulation started (the clock a client core is driven with).
    pub fn now_ms(&self) -> u64 {
        self.shards[0].ctx.now().duration_since(self.t0).as_millis() as u64
    }

    /// A pod for (tenant, agent) appears: the registry lists it and every shard hears of it,
    /// as the registry's callback does on a real node. `echo`: it echoes every DATA.
    pub fn add_pod(&mut self, tenant: u32, agent: u32, echo: bool) {
        let key = (tenant, agent);
        let pod = self.pods.entry(key).or_default();
        pod.listening = true;
        pod.path = crate::pods::links::socket_path(&self.dir, tenant, agent);
        pod.echo = echo;
        self.shared
            .registry
            .set_present(PodKey { tenant, agent }, true);
        for i in 0..self.shards.len() {
            self.deliver(i, ShardMsg::PodAdded(tenant, agent));
        }
        self.settle();
    }

    /// The pod goes away: its links close (the shards see EOF), the registry forgets it and
    /// every shard hears of the removal.
    pub fn remove_pod(&mut self, tenant: u32, agent: u32) {
        let key = (tenant, agent);
        let links = match self.pods.get_mut(&key) {
            Some(p) => {
                p.listening = false;
                std::mem::take(&mut p.links)
            }
            None => return,
        };
        for (i, conn, _) in links {
            let s = &mut self.shards[i];
            s.ctx.peer_gone(conn);
            s.h.on_closed(&mut s.ctx, conn, None);
        }
        self.shared
            .registry
            .set_present(PodKey { tenant, agent }, false);
        for i in 0..self.shards.len() {
            self.deliver(i, ShardMsg::PodRemoved(tenant, agent));
        }
        self.settle();
    }

    /// A pod's link on `shard` breaks (the pod restarts; its socket stays).
    pub fn break_pod_link(&mut self, tenant: u32, agent: u32, shard: usize) {
        let Some(p) = self.pods.get_mut(&(tenant, agent)) else {
            return;
        };
        let Some(at) = p.links.iter().position(|l| l.0 == shard) else {
            return;
        };
        let (i, conn, _) = p.links.remove(at);
        let s = &mut self.shards[i];
        s.ctx.peer_gone(conn);
        s.h.on_closed(&mut s.ctx, conn, None);
        self.settle();
    }

    /// Sends DATA from the pod to one of its sessions (over the link of the shard that holds
    /// it); false if the pod has no link to that shard.
    pub fn pod_send(&mut self, tenant: u32, agent: u32, sid: u32, msg: &PodMsg<'_>) -> bool {
        let shard = self.shard_of(sid);
        let Some(p) = self.pods.get(&(tenant, agent)) else {
            return false;
        };
        let Some(&(i, conn, _)) = p.links.iter().find(|l| l.0 == shard) else {
            return false;
        };
        let mut out = Vec::new();
        podlink::encode(&mut out, sid, msg);
        let s = &mut self.shards[i];
        s.h.on_data(&mut s.ctx, conn, &out);
        self.settle();
        true
    }

    /// The shard that owns session `sid` (ids carry their shard).
    pub fn shard_of(&self, sid: u32) -> usize {
        crate::session::IdSpace::new(0, self.shards.len()).owner(sid)
    }

    /// A new client connection accepted on `shard`; returns its handle.
    pub fn connect(&mut self, shard: usize) -> usize {
        self.next_port = self.next_port.wrapping_add(1).max(10_000);
        let peer = SocketAddr::from(([127, 0, 0, 1], self.next_port));
        let s = &mut self.shards[shard];
        let conn = s.ctx.accept(peer);
        s.h.on_accept(&mut s.ctx, conn, peer);
        self.clients.push(SimClient {
            at: Some((shard, conn)),
            peer: Some(peer),
            ..SimClient::default()
        });
        self.settle();
        self.clients.len() - 1
    }

    /// Bytes from client `c` to the server (ignored once its connection is gone).
    pub fn client_send(&mut self, c: usize, bytes: &[u8]) {
        let Some((i, conn)) = self.clients.get(c).and_then(|x| x.at) else {
            return;
        };
        let s = &mut self.shards[i];
        if s.ctx.is_open(conn) && s.ctx.is_reading(conn) {
            s.h.on_data(&mut s.ctx, conn, bytes);
        } else if s.ctx.is_open(conn) {
            // Not read now: the kernel would keep it; so does the connection's record.
            if let Some(x) = s.ctx.conn_mut(conn) {
                x.held_input.extend_from_slice(bytes);
            }
        }
        self.settle();
    }

    /// Takes what the server sent to client `c`.
    pub fn client_take(&mut self, c: usize) -> Vec<u8> {
        self.clients
            .get_mut(c)
            .map(|x| std::mem::take(&mut x.inbox))
            .unwrap_or_default()
    }

    /// Whether client `c`'s connection is still open.
    pub fn client_open(&self, c: usize) -> bool {
        self.clients.get(c).is_some_and(|x| x.at.is_some())
    }

    /// Client `c`'s connection drops (network loss, the client quit).
    pub fn client_drop(&mut self, c: usize) {
        let Some((i, conn)) = self.clients.get_mut(c).and_then(|x| x.at.take()) else {
            return;
        };
        let s = &mut self.shards[i];
        if s.ctx.is_open(conn) {
            s.ctx.peer_gone(conn);
            s.h.on_closed(&mut s.ctx, conn, None);
        }
        self.settle();
    }

    /// Sets what the runtime reports for client `c`'s connection: bytes not yet delivered
    /// (`unsent`) and whether its queue is over the high watermark. Clearing the watermark
    /// calls the shard's `on_writable`.
    pub fn client_backlog(&mut self, c: usize, unsent: usize, backpressured: bool) {
        let Some((i, conn)) = self.clients.get(c).and_then(|x| x.at) else {
            return;
        };
        let s = &mut self.shards[i];
        let was = s.ctx.conn(conn).is_some_and(|x| x.backpressured);
        if let Some(x) = s.ctx.conn_mut(conn) {
            x.unsent = unsent;
            x.backpressured = backpressured;
        }
        if was && !backpressured {
            s.h.on_writable(&mut s.ctx, conn);
        }
        self.settle();
    }

    /// Moves the clock of every shard forward by `by`, in steps of `step` (at least 1 ms),
    /// running each shard's timers as they come due.
    pub fn advance(&mut self, by: Duration, step: Duration) {
        let step = step.max(Duration::from_millis(1));
        let mut left = by;
        while !left.is_zero() {
            let d = left.min(step);
            left -= d;
            for s in &mut self.shards {
                s.ctx.advance(d);
            }
            for i in 0..self.shards.len() {
                let s = &mut self.shards[i];
                if let Some(at) = s.ctx.take_due_wake() {
                    s.h.on_tick(&mut s.ctx, at);
                }
            }
            self.settle();
        }
    }

    /// Shuts every shard down (SIGTERM), then settles.
    pub fn shutdown(&mut self) {
        for s in &mut self.shards {
            s.h.on_shutdown(&mut s.ctx);
        }
        self.settle();
    }

    /// Bytes from the pod to session `sid` that reach its link's socket but are not read yet
    /// (the kernel holds them): what a live upgrade hands over as unread.
    pub fn pod_send_unread(&mut self, tenant: u32, agent: u32, sid: u32, msg: &PodMsg<'_>) {
        let shard = self.shard_of(sid);
        let Some(p) = self.pods.get(&(tenant, agent)) else {
            return;
        };
        let Some(&(i, conn, _)) = p.links.iter().find(|l| l.0 == shard) else {
            return;
        };
        let mut out = Vec::new();
        podlink::encode(&mut out, sid, msg);
        if let Some(x) = self.shards[i].ctx.conn_mut(conn) {
            x.held_input.extend_from_slice(&out);
        }
    }

    /// A live upgrade (`clawtermd --upgrade`) to a new simulated process: every shard freezes
    /// and exports, as the runtime would finish each export (with the bytes a connection had
    /// received but not delivered and the output it had not sent), and a new node starts with
    /// what was handed over. Clients and pods keep their handles: their connections move.
    pub fn upgrade(mut self) -> Sim {
        let n = self.shards.len();
        let (tx, rx) = crossbeam_channel::unbounded();
        // Which exported connection is which: clients and pod links by (shard, conn).
        let mut order: Vec<Vec<ConnId>> = vec![Vec::new(); n];
        // Every shard stops accepting first, then they move one at a time.
        let (qtx, qrx) = crossbeam_channel::unbounded();
        for i in 0..n {
            self.deliver(i, ShardMsg::Quiesce(qtx.clone()));
            let s = &mut self.shards[i];
            s.h.on_accept_stopped(&mut s.ctx);
        }
        assert_eq!(qrx.try_iter().count(), n, "every shard stopped accepting");
        for (i, ids) in order.iter_mut().enumerate() {
            self.deliver(i, ShardMsg::Export(tx.clone()));
            let s = &mut self.shards[i];
            for (conn, msg) in s.ctx.take_exports() {
                let out = s.ctx.take_output(conn);
                let unread = s
                    .ctx
                    .conn_mut(conn)
                    .map(|x| std::mem::take(&mut x.held_input))
                    .unwrap_or_default();
                let fd: std::os::fd::OwnedFd = match std::fs::File::open("/dev/null") {
                    Ok(f) => f.into(),
                    Err(e) => panic!("/dev/null: {e}"),
                };
                ids.push(conn);
                s.h.on_exported(&mut s.ctx, conn, fd, unread, out, msg);
            }
            // The runtime has let go of the listener (no accept was in flight).
            if s.ctx.accept_stopped() {
                s.h.on_accept_stopped(&mut s.ctx);
            }
        }
        drop(tx);
        let mut restores: Vec<super::shard::Restore> = (0..n).map(|_| Default::default()).collect();
        // (shard, old conn) of each moved client connection / pod link, in the order the
        // new shard adopts them: links first, then clients.
        let mut moved_ids: Vec<Vec<ConnId>> = vec![Vec::new(); n];
        for x in rx.try_iter() {
            let i = x.shard;
            let mut m = super::shard::Moved::default();
            let mut links = Vec::new();
            let mut clients = Vec::new();
            // Exports finished in `order`; links and clients keep that order among themselves.
            let (mut li, mut ci) = (x.links.into_iter(), x.conns.into_iter());
            for &conn in &order[i] {
                let is_link = self
                    .pods
                    .values()
                    .any(|p| p.links.iter().any(|l| l.0 == i && l.1 == conn));
                if is_link {
                    if let Some(l) = li.next() {
                        links.push(conn);
                        m.links.push(l);
                    }
                } else if let Some(c) = ci.next() {
                    clients.push(conn);
                    m.conns.push(c);
                }
            }
            moved_ids[i] = links.into_iter().chain(clients).collect();
            restores[i].records = x.sessions;
            restores[i].moved = Some(m);
        }
        let cfg = self.shared.cfg.clone();
        let dir = self.dir.clone();
        // The new process's shards start empty, accepting paused, and take their parts in
        // as messages, as in `server::start`.
        let mut next = Sim::with_restores(cfg, (0..n).map(|_| Default::default()).collect());
        // The registry of the node is the same pods; connections get their new ids.
        for (key, p) in &self.pods {
            next.shared.registry.set_present(
                PodKey {
                    tenant: key.0,
                    agent: key.1,
                },
                p.listening,
            );
        }
        let (done_tx, done_rx) = crossbeam_channel::unbounded();
        for (i, r) in restores.into_iter().enumerate() {
            next.shards[i].ctx.pause_accepting();
            next.deliver(i, ShardMsg::TakeOver(Box::new(r), done_tx.clone()));
        }
        assert_eq!(
            done_rx.try_iter().count(),
            n,
            "every shard took its part in"
        );
        for i in 0..n {
            next.deliver(i, ShardMsg::Serve);
            assert!(
                !next.shards[i].ctx.accept_paused(),
                "shard {i} accepts again"
            );
        }
        let mut remap: HashMap<(usize, ConnId), (usize, ConnId)> = HashMap::new();
        for (i, ids) in moved_ids.iter().enumerate() {
            let adopted = next.shards[i].ctx.take_adopted();
            for (old, new) in ids.iter().zip(adopted) {
                remap.insert((i, *old), (i, new));
            }
        }
        for c in &mut self.clients {
            c.at = c.at.and_then(|at| remap.get(&at).copied());
        }
        for p in self.pods.values_mut() {
            for l in &mut p.links {
                if let Some(&(_, new)) = remap.get(&(l.0, l.1)) {
                    l.1 = new;
                }
            }
            p.links.retain(|l| remap.values().any(|v| *v == (l.0, l.1)));
        }
        next.clients = std::mem::take(&mut self.clients);
        next.pods = std::mem::take(&mut self.pods);
        next.dir = dir;
        next.next_port = self.next_port;
        next.settle();
        next
    }

    fn deliver(&mut self, to: usize, msg: ShardMsg) {
        if let Some(s) = self.shards.get_mut(to) {
            s.h.on_message(&mut s.ctx, msg);
        }
    }

    /// Delivers everything in flight (connects, messages, hand-offs, pod answers, client
    /// output, input a shard resumed reading) until nothing moves. Panics on a stall (more than
    /// `SETTLE_ROUNDS` rounds): a shard that keeps itself busy forever is a bug.
    pub fn settle(&mut self) {
        for _ in 0..SETTLE_ROUNDS {
            if !self.round() {
                return;
            }
        }
        panic!("the simulated node did not settle in {SETTLE_ROUNDS} rounds");
    }

    /// One round of delivery; whether anything moved.
    fn round(&mut self) -> bool {
        let mut moved = false;
        // The end of the previous turn, as the runtime would call it before waiting.
        for s in &mut self.shards {
            s.h.on_turn_end(&mut s.ctx);
        }
        for i in 0..self.shards.len() {
            // Unix connects: to a pod that is there, or refused.
            for (conn, path) in self.shards[i].ctx.take_connects() {
                moved = true;
                let pod = self
                    .pods
                    .values_mut()
                    .find(|p| p.path == path && p.listening);
                let res = match pod {
                    Some(p) => {
                        p.links.push((i, conn, Vec::new()));
                        Ok(())
                    }
                    None => Err(io::Error::from(io::ErrorKind::ConnectionRefused)),
                };
                let s = &mut self.shards[i];
                if res.is_err() {
                    s.ctx.peer_gone(conn);
                }
                s.h.on_connected(&mut s.ctx, conn, res);
            }
            for (to, msg) in self.shards[i].ctx.take_messages() {
                moved = true;
                self.deliver(to, msg);
            }
            for (conn, to, msg) in self.shards[i].ctx.take_hand_offs() {
                moved = true;
                self.hand_off(i, conn, to, msg);
            }
        }
        moved |= self.pump_clients();
        moved |= self.pump_pods();
        moved
    }

    /// Output of client connections to their inboxes; connections the server ended are
    /// noted; input held while a connection was not read is delivered once it is read again.
    fn pump_clients(&mut self) -> bool {
        let mut moved = false;
        for c in 0..self.clients.len() {
            let Some((i, conn)) = self.clients[c].at else {
                continue;
            };
            let s = &mut self.shards[i];
            let out = s.ctx.take_output(conn);
            if !out.is_empty() {
                moved = true;
                self.clients[c].inbox.extend_from_slice(&out);
            }
            let s = &mut self.shards[i];
            if !s.ctx.is_open(conn) {
                if s.ctx.ending(conn) != Some(shards::sim::Ending::HandedOff) {
                    self.clients[c].at = None;
                    moved = true;
                }
                continue;
            }
            if s.ctx.is_reading(conn) {
                let held = s
                    .ctx
                    .conn_mut(conn)
                    .map(|x| std::mem::take(&mut x.held_input))
                    .unwrap_or_default();
                if !held.is_empty() {
                    moved = true;
                    s.h.on_data(&mut s.ctx, conn, &held);
                }
            }
        }
        moved
    }

    /// A connection handed from shard `from` to `to`: the bytes it had queued reach the client
    /// first, then it is adopted under a new id.
    fn hand_off(&mut self, from: usize, conn: ConnId, to: usize, msg: ShardMsg) {
        let out = self.shards[from].ctx.take_output(conn);
        let held = self.shards[from]
            .ctx
            .conn_mut(conn)
            .map(|x| std::mem::take(&mut x.held_input))
            .unwrap_or_default();
        let c = self.clients.iter().position(|x| x.at == Some((from, conn)));
        let peer = c
            .and_then(|c| self.clients[c].peer)
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 1)));
        let Some(s) = self.shards.get_mut(to) else {
            return;
        };
        let new = s.ctx.accept(peer);
        if let Some(c) = c {
            self.clients[c].inbox.extend_from_slice(&out);
            self.clients[c].at = Some((to, new));
        }
        let s = &mut self.shards[to];
        s.h.on_adopt(&mut s.ctx, new, peer, held, msg);
    }

    /// Pod links: decode what each shard sent its pods, record it, answer HELLO, echo DATA.
    fn pump_pods(&mut self) -> bool {
        let mut moved = false;
        let mut replies: Vec<(usize, ConnId, Vec<u8>)> = Vec::new();
        for pod in self.pods.values_mut() {
            for (i, conn, inbuf) in pod.links.iter_mut() {
                let out = self.shards[*i].ctx.take_output(*conn);
                if out.is_empty() {
                    continue;
                }
                moved = true;
                inbuf.extend_from_slice(&out);
                let mut reply = Vec::new();
                let mut off = 0;
                while let Ok(podlink::Decoded::Msg {
                    session_id,
                    msg,
                    used,
                }) = podlink::decode(&inbuf[off..])
                {
                    off += used;
                    match msg {
                        PodMsg::Hello { .. } => podlink::encode(
                            &mut reply,
                            0,
                            &PodMsg::Hello {
                                version: podlink::codec::VERSION,
                                name: "sim pod",
                            },
                        ),
                        PodMsg::Open(_) => pod.opened.push(session_id),
                        PodMsg::Reopen(_) => pod.reopened.push(session_id),
                        PodMsg::Close(_) => pod.closed.push(session_id),
                        PodMsg::Data(d) => {
                            pod.input
                                .entry(session_id)
                                .or_default()
                                .extend_from_slice(d);
                            if pod.echo {
                                podlink::encode(&mut reply, session_id, &PodMsg::Data(d));
                            }
                        }
                        other => pod
                            .events
                            .entry(session_id)
                            .or_default()
                            .push(other.ty().name()),
                    }
                }
                inbuf.drain(..off);
                if !reply.is_empty() {
                    replies.push((*i, *conn, reply));
                }
            }
        }
        for (i, conn, reply) in replies {
            let s = &mut self.shards[i];
            if s.ctx.is_open(conn) {
                s.h.on_data(&mut s.ctx, conn, &reply);
            }
        }
        moved
    }
}
