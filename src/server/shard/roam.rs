//! ClawRoam, the shard's side (docs/CLUSTER.md):
//!
//! * **Leaving** (source): freeze (client input stays unread, the pod is PAUSEd and asked to
//!   EXPORT), collect the agent's STATE, offer the session record with it to the target at the
//!   next epoch, and once the target is warm flip the holder in the keeper (compare-and-set on
//!   the epoch). Then, and only then, let go: COMMIT to the target, ROAM to the client, CLOSE
//!   reason 5 to the pod, and a tombstone that forwards later RESUMEs. Any failure before the
//!   flip calls the move off: CONTINUE to the pod, the client is read again, nothing lost.
//! * **Arriving** (target): a MIGRATE becomes a warm session (REOPEN and STATE to this node's
//!   pod, READY back) that serves nobody until COMMIT — or until the keeper shows this node
//!   holds it, if the COMMIT was lost.
//! * **Elsewhere**: a RESUME for a session this node does not hold is answered with ROAM when
//!   a tombstone or the keeper knows its holder and the RESUME carries its token.

use super::super::cluster::{RoamOutcome, SessionRow};
use super::super::metrics::ShardMetrics;
use super::{Client, ConnState, Key, ShardHandler, ShardMsg};
use crate::cluster::keeper::{token_hash, Claim, Entry, KeeperError};
use crate::cluster::peer::PeerMsg;
use crate::podlink::{self, Msg as PodMsg};
use crate::proto::{self, FrameType, CAP_ROAM};
use crate::session::table::IdMap;
use crate::session::{Session, State};
use crate::state::wall_ms;
use shards::Context;
use std::net::SocketAddr;
use tracing::{debug, info, warn};

/// Time the pod has to export a session's state.
const EXPORT_MS: u64 = 2_000;
/// Time the target has to be warm, and the keeper to answer a flip, before the move is
/// called off.
const READY_MS: u64 = 5_000;
/// Time a warm copy waits for COMMIT before it asks the keeper who holds the session. Longer
/// than the source may take to flip it (READY within `READY_MS` of the offer, then a flip that
/// the keeper refuses after `CLAIM_TIMEOUT`, 3 s), with margin: when the target asks, no flip
/// can land any more, so its answer is final.
const WARM_MS: u64 = 12_000;
/// Largest agent state a session may carry to another node.
const MAX_STATE: usize = 64 << 20;
/// How long a keeper answer about where a session lives is trusted.
const LOCATED_MS: u64 = 1_000;

/// The shard's ClawRoam state.
#[derive(Default)]
pub(super) struct Roaming {
    /// Sessions leaving this node.
    out: IdMap<u32, Outgoing>,
    /// Sessions arriving, warm, not yet serving.
    warm: IdMap<u32, Warm>,
    /// Sessions that left: where they went.
    tombs: IdMap<u32, Tomb>,
    /// Keeper answers for RESUMEs of sessions held elsewhere (`None`: not found).
    located: IdMap<u32, (Option<Entry>, u64)>,
    /// Connections whose RESUME waits (for a warm session's COMMIT, or a keeper answer).
    parked: IdMap<u32, Vec<Client>>,
    /// Epochs of sessions that arrived here (a session made here is at epoch 1).
    epochs: IdMap<u32, u64>,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum OutPhase {
    /// PAUSE and EXPORT sent; STATE arriving.
    Exporting,
    /// MIGRATE sent; waiting for READY.
    Offered,
    /// READY came; the keeper is flipping the holder.
    Claiming,
    /// The flip's answer was lost: asking the keeper what it holds.
    Rechecking,
}

struct Outgoing {
    to: String,
    /// The epoch the session will have at the target.
    epoch: u64,
    phase: OutPhase,
    state: Vec<u8>,
    started_us: u64,
    deadline: u64,
    reply: Option<crossbeam_channel::Sender<RoamOutcome>>,
    /// Times the keeper was asked, in vain, whether a flip whose answer was lost happened.
    rechecks: u32,
}

struct Warm {
    from: String,
    epoch: u64,
    deadline: u64,
    ready_sent: bool,
    /// The keeper was asked, after the deadline, whether this node holds it.
    asked: bool,
}

struct Tomb {
    node: String,
    client: SocketAddr,
    epoch: u64,
    token_hash: [u8; 32],
    caps: u8,
    expires: u64,
}

impl Roaming {
    /// Whether `sid` is frozen for a move (its input and timers wait). On the per-frame path:
    /// with no move under way it costs two length checks, no lookup.
    pub(super) fn frozen(&self, sid: u32) -> bool {
        (!self.out.is_empty() && self.out.contains_key(&sid))
            || (!self.warm.is_empty() && self.warm.contains_key(&sid))
    }

    /// The epoch of `sid` on this node.
    fn epoch(&self, sid: u32) -> u64 {
        self.epochs.get(&sid).copied().unwrap_or(1)
    }
}

impl ShardHandler {
    /// `clawtermctl roam` / drain: start moving `sid` to node `to`. `force` moves a session
    /// whose pod cannot export its state (pod-link version 1) without it.
    pub(super) fn roam_out(
        &mut self,
        ctx: &mut impl Context<ShardMsg>,
        sid: u32,
        to: String,
        force: bool,
        reply: crossbeam_channel::Sender<RoamOutcome>,
    ) {
        let refuse = |why: String| {
            let _ = reply.send(RoamOutcome::Refused(why));
        };
        let Some(cluster) = self.shared.cluster.clone() else {
            return refuse("this node is not in a cluster (no --keeper)".into());
        };
        if to == cluster.id() {
            return refuse(format!("session {sid:08x} is already on {to}"));
        }
        match cluster.node(&to) {
            Some(n) if n.alive => {}
            Some(_) => return refuse(format!("node {to} is down")),
            None => return refuse(format!("no node {to} in the cluster")),
        }
        if self.roam.frozen(sid) {
            return refuse(format!("session {sid:08x} is already moving"));
        }
        let Some(s) = self.table.get(sid) else {
            return refuse(format!("no session {sid:08x} on this node"));
        };
        if s.state() == State::Closed || s.agent_closed() {
            return refuse(format!("session {sid:08x} is ending"));
        }
        let key = (s.tenant(), s.agent());
        let Some(l) = self.links.get(key) else {
            return refuse(format!("session {sid:08x}: no link to its agent pod"));
        };
        if !l.is_up() {
            return refuse(format!("session {sid:08x}: its agent pod is away"));
        }
        let exports = l.pod_version() >= podlink::codec::VERSION_MIGRATE;
        if !exports && !force {
            return refuse(format!(
                "session {sid:08x}: its pod cannot export agent state (pod-link version 1); --force moves it without"
            ));
        }
        let now = self.now(ctx);
        let mut msgs = Vec::new();
        podlink::encode(&mut msgs, sid, &PodMsg::Pause);
        if exports {
            podlink::encode(&mut msgs, sid, &PodMsg::Export);
        }
        self.link_send(ctx, key, &msgs);
        if let Some(&c) = self.attached.get(&sid) {
            self.clients.set_reading(ctx, c, false);
        }
        let epoch = self.roam.epoch(sid) + 1;
        self.roam.out.insert(
            sid,
            Outgoing {
                to,
                epoch,
                phase: OutPhase::Exporting,
                state: Vec::new(),
                started_us: self.clock.us(ctx.now()),
                deadline: now + EXPORT_MS,
                reply: Some(reply),
                rechecks: 0,
            },
        );
        ShardMetrics::inc(&self.m().roams_started, 1);
        self.roam_timer(ctx, sid, now + EXPORT_MS);
        if !exports {
            self.roam_offer(ctx, sid);
        }
    }

    /// A STATE chunk from the pod: the exporting session's state grows; the empty one ends it.
    /// Returns false when the message is not for a move (it is then ignored).
    pub(super) fn roam_state(
        &mut self,
        ctx: &mut impl Context<ShardMsg>,
        sid: u32,
        chunk: &[u8],
    ) -> bool {
        let Some(o) = self.roam.out.get_mut(&sid) else {
            return false;
        };
        if o.phase != OutPhase::Exporting {
            return true;
        }
        if chunk.is_empty() {
            self.roam_offer(ctx, sid);
            return true;
        }
        if o.state.len() + chunk.len() > MAX_STATE {
            self.roam_call_off(
                ctx,
                sid,
                format!("agent state over {} MiB", MAX_STATE >> 20),
            );
            return true;
        }
        o.state.extend_from_slice(chunk);
        true
    }

    /// The state is in: offer the session to the target.
    fn roam_offer(&mut self, ctx: &mut impl Context<ShardMsg>, sid: u32) {
        let now = self.now(ctx);
        let (Some(s), Some(cluster)) = (self.table.get(sid), self.shared.cluster.clone()) else {
            return;
        };
        let record = s.to_record(now, wall_ms());
        let caps = s.caps();
        let Some(o) = self.roam.out.get_mut(&sid) else {
            return;
        };
        let msg = PeerMsg::Migrate {
            sid,
            epoch: o.epoch,
            from: cluster.id().to_string(),
            record,
            state: std::mem::take(&mut o.state),
            caps_hint: caps,
        };
        o.phase = OutPhase::Offered;
        o.deadline = now + READY_MS;
        let to = o.to.clone();
        if !cluster.send(&to, msg) {
            self.roam_call_off(ctx, sid, format!("no peer link to {to}"));
            return;
        }
        self.roam_timer(ctx, sid, now + READY_MS);
    }

    /// A message from another node about one of this shard's sessions.
    pub(super) fn on_peer(&mut self, ctx: &mut impl Context<ShardMsg>, from: String, msg: PeerMsg) {
        match msg {
            PeerMsg::Migrate {
                sid,
                epoch,
                from: origin,
                record,
                state,
                ..
            } => {
                if origin != from {
                    warn!(peer = %from, session = sid, "MIGRATE naming another source; refused");
                    return;
                }
                if let Err(why) = self.roam_in(ctx, sid, epoch, &from, &record, &state) {
                    info!(peer = %from, session = sid, epoch, "hand-over refused: {why}");
                    if let Some(c) = self.shared.cluster.clone() {
                        c.send(
                            &from,
                            PeerMsg::Refuse {
                                sid,
                                epoch,
                                reason: why,
                            },
                        );
                    }
                }
            }
            PeerMsg::Ready { sid, epoch } => {
                let Some(o) = self.roam.out.get_mut(&sid) else {
                    return;
                };
                if o.epoch != epoch || o.to != from || o.phase != OutPhase::Offered {
                    return;
                }
                o.phase = OutPhase::Claiming;
                let to = o.to.clone();
                if let Some(c) = self.shared.cluster.clone() {
                    c.claim(self.index, sid, epoch, &to);
                }
            }
            PeerMsg::Refuse { sid, epoch, reason }
                if self.roam.out.get(&sid).is_some_and(|o| {
                    o.epoch == epoch && o.to == from && o.phase == OutPhase::Offered
                }) =>
            {
                self.roam_call_off(ctx, sid, format!("{from} refused: {reason}"));
            }
            PeerMsg::Commit { sid, epoch }
                if self
                    .roam
                    .warm
                    .get(&sid)
                    .is_some_and(|w| w.epoch == epoch && w.from == from) =>
            {
                self.roam_serve(ctx, sid);
            }
            PeerMsg::Abort { sid, epoch }
                if self
                    .roam
                    .warm
                    .get(&sid)
                    .is_some_and(|w| w.epoch == epoch && w.from == from) =>
            {
                self.roam_drop_warm(ctx, sid, "the source called the move off");
            }
            msg @ (PeerMsg::RelayOpen { .. }
            | PeerMsg::RelayData { .. }
            | PeerMsg::RelayClose { .. }) => self.on_relay_msg(ctx, from, msg),
            _ => {}
        }
    }

    /// A session arriving: checked, placed warm, its pod given REOPEN and the state.
    fn roam_in(
        &mut self,
        ctx: &mut impl Context<ShardMsg>,
        sid: u32,
        epoch: u64,
        from: &str,
        record: &[u8],
        state: &[u8],
    ) -> Result<(), String> {
        if let Some(t) = self.roam.tombs.get(&sid) {
            if t.epoch >= epoch {
                return Err(format!(
                    "epoch {epoch} is not newer than the {} this node handed it over at (a replayed hand-over)",
                    t.epoch
                ));
            }
        }
        if self.table.get(sid).is_some() {
            return Err("a session with that id is already here".into());
        }
        if epoch < 2 {
            return Err(format!("epoch {epoch}: a hand-over is at epoch 2 or later"));
        }
        let now = self.now(ctx);
        let (mut s, used) = Session::from_record(record, now, wall_ms())
            .map_err(|e| format!("session record unreadable: {e}"))?;
        if used != record.len() || s.id() != sid {
            return Err("session record does not match the hand-over".into());
        }
        s.restored(now);
        let key = (s.tenant(), s.agent());
        let caps = s.caps();
        if !self.shared.pod_present(key.0, key.1) || !self.ensure_link(ctx, key) {
            return Err(format!(
                "no agent pod for tenant {} agent {} on this node",
                key.0, key.1
            ));
        }
        if !self.shared.reserve_session() {
            return Err("this node is at --max-sessions".into());
        }
        if self.table.insert(s).is_none() {
            self.shared.release_session();
            return Err("a session with that id is already here".into());
        }
        if let Some(l) = self.links.get_mut(key) {
            l.add_session(sid);
        }
        let mut msgs = Vec::with_capacity(state.len() + 64);
        let peer = format!("roamed from {from}");
        podlink::encode(
            &mut msgs,
            sid,
            &PodMsg::Reopen(podlink::Open {
                tenant: key.0,
                agent: key.1,
                client_caps: caps,
                peer: &peer,
            }),
        );
        podlink::encode(&mut msgs, sid, &PodMsg::Detached);
        for chunk in state.chunks(podlink::codec::MAX_BODY) {
            podlink::encode(&mut msgs, sid, &PodMsg::State(chunk));
        }
        podlink::encode(&mut msgs, sid, &PodMsg::State(&[]));
        self.link_send(ctx, key, &msgs);
        self.roam.epochs.insert(sid, epoch);
        self.roam.tombs.remove(&sid);
        self.roam.warm.insert(
            sid,
            Warm {
                from: from.to_string(),
                epoch,
                deadline: now + WARM_MS,
                ready_sent: false,
                asked: false,
            },
        );
        self.roam_ready(ctx, sid);
        Ok(())
    }

    /// READY goes back once the pod link is up (the REOPEN and the state are on their way
    /// to the pod); until then the shard looks again shortly.
    fn roam_ready(&mut self, ctx: &mut impl Context<ShardMsg>, sid: u32) {
        let now = self.now(ctx);
        let Some(key) = self.table.get(sid).map(|s| (s.tenant(), s.agent())) else {
            return;
        };
        let up = self.links.get(key).is_some_and(|l| l.is_up());
        let Some(w) = self.roam.warm.get_mut(&sid) else {
            return;
        };
        if up {
            w.ready_sent = true;
            let (from, epoch, deadline) = (w.from.clone(), w.epoch, w.deadline);
            if let Some(c) = self.shared.cluster.clone() {
                c.send(&from, PeerMsg::Ready { sid, epoch });
            }
            self.roam_timer(ctx, sid, deadline);
        } else {
            self.roam_timer(ctx, sid, now + 5);
        }
    }

    /// COMMIT (or the keeper's word): the warm session serves from now on.
    fn roam_serve(&mut self, ctx: &mut impl Context<ShardMsg>, sid: u32) {
        if self.roam.warm.remove(&sid).is_none() {
            return;
        }
        ShardMetrics::inc(&self.m().roams_in, 1);
        self.persist_meta(ctx, sid);
        // The directory names this node at the hand-over's epoch (the source flipped it; this
        // repairs it should a Redis fail-over have lost the flip or the record).
        if let Some(&epoch) = self.roam.epochs.get(&sid) {
            self.directory_adopt(sid, epoch);
        }
        self.arm(ctx, sid);
        debug!(session = sid, "roamed-in session serves");
        self.redrive_parked(ctx, sid);
    }

    /// A warm copy that will not serve: gone, its pod told, its waiting RESUMEs answered.
    fn roam_drop_warm(&mut self, ctx: &mut impl Context<ShardMsg>, sid: u32, why: &str) {
        if self.roam.warm.remove(&sid).is_none() {
            return;
        }
        debug!(session = sid, "warm copy dropped: {why}");
        self.roam.epochs.remove(&sid);
        if let Some(key) = self.forget_session(sid) {
            let mut msg = Vec::new();
            podlink::encode(&mut msg, sid, &PodMsg::Close(podlink::CloseReason::Normal));
            self.link_send(ctx, key, &msg);
        }
        self.redrive_parked(ctx, sid);
    }

    /// The keeper's answer to the holder flip.
    pub(super) fn roam_claimed(
        &mut self,
        ctx: &mut impl Context<ShardMsg>,
        sid: u32,
        epoch: u64,
        result: Result<Claim, KeeperError>,
    ) {
        let Some(o) = self.roam.out.get(&sid) else {
            return;
        };
        if o.epoch != epoch || o.phase != OutPhase::Claiming {
            return;
        }
        match result {
            // Missing: the directory lost the record (a Redis fail-over): the nodes hold the
            // truth, and this one still holds the session, frozen; the target writes it anew.
            Ok(Claim::Done) | Ok(Claim::Missing) => self.roam_release(ctx, sid),
            Ok(Claim::Stale { node, epoch: e }) => {
                warn!(
                    session = sid,
                    keeper_node = %node,
                    keeper_epoch = e,
                    mine = epoch - 1,
                    "keeper holds another epoch for this session; move called off"
                );
                self.roam_call_off(
                    ctx,
                    sid,
                    format!(
                        "keeper shows {node} at epoch {e}, not this node at {}",
                        epoch - 1
                    ),
                );
            }
            Err(KeeperError::Ambiguous(why)) => {
                // The flip may have happened: ask before deciding.
                debug!(session = sid, "flip answer lost ({why}); asking the keeper");
                if let Some(o) = self.roam.out.get_mut(&sid) {
                    o.phase = OutPhase::Rechecking;
                }
                if let Some(c) = self.shared.cluster.clone() {
                    c.locate(self.index, sid);
                }
            }
            Err(e) => self.roam_call_off(ctx, sid, format!("keeper: {e}")),
        }
    }

    /// The keeper's answer about where a session lives (`Err`: it gave none): a lost flip is settled, a late warm copy serves
    /// or goes, and RESUMEs waiting for the answer go on.
    pub(super) fn on_located(
        &mut self,
        ctx: &mut impl Context<ShardMsg>,
        sid: u32,
        answer: Result<Option<Entry>, KeeperError>,
    ) {
        let me = self
            .shared
            .cluster
            .as_ref()
            .map(|c| c.id().to_string())
            .unwrap_or_default();
        if let Some(o) = self.roam.out.get(&sid) {
            if o.phase == OutPhase::Rechecking {
                match &answer {
                    Ok(Some(e)) if e.node == o.to && e.epoch == o.epoch => {
                        self.roam_release(ctx, sid)
                    }
                    Ok(Some(e)) if e.node == me && e.epoch < o.epoch => {
                        self.roam_call_off(ctx, sid, "the keeper kept this node".into())
                    }
                    // The keeper answered and has no record: no flip landed (a late one is
                    // refused by its deadline; a record Redis lost, the target finds missing
                    // too, and drops its copy).
                    Ok(None) => {
                        self.roam_call_off(ctx, sid, "the keeper has no record of the flip".into())
                    }
                    // No answer (or one that names neither side): the flip may or may not have
                    // landed. The session stays frozen here until the keeper can say which
                    // (never guessed: a node that took it back while the target, asking the
                    // keeper, found the flip would serve it twice). Asked again, 200 ms apart
                    // growing to 1 s.
                    _ => {
                        let rechecks = o.rechecks;
                        if let Some(o) = self.roam.out.get_mut(&sid) {
                            o.rechecks += 1;
                        }
                        if rechecks == 10 {
                            warn!(
                                session = sid,
                                "flip outcome unknown: the session waits, frozen, for the keeper"
                            );
                        }
                        let now = self.now(ctx);
                        let wait = (200 * (1 + u64::from(rechecks) / 5)).min(1000);
                        self.roam_timer(ctx, sid, now + wait);
                    }
                }
                return;
            }
        }
        if let Some(w) = self.roam.warm.get(&sid) {
            if w.asked {
                match &answer {
                    Ok(Some(e)) if e.node == me && e.epoch == w.epoch => self.roam_serve(ctx, sid),
                    Ok(_) => self.roam_drop_warm(ctx, sid, "the keeper names no flip to this node"),
                    Err(_) => {
                        if let Some(w) = self.roam.warm.get_mut(&sid) {
                            w.asked = false;
                        }
                        let now = self.now(ctx);
                        self.roam_timer(ctx, sid, now + 500);
                    }
                }
                return;
            }
        }
        // A RESUME that waited: no answer counts as no record (NO_SUCH_SESSION, as alone).
        let entry = answer.unwrap_or(None);
        let now = self.now(ctx);
        self.roam.located.insert(sid, (entry, now + LOCATED_MS));
        self.redrive_parked(ctx, sid);
    }

    /// The flip is done: let go of the session.
    fn roam_release(&mut self, ctx: &mut impl Context<ShardMsg>, sid: u32) {
        let Some(o) = self.roam.out.remove(&sid) else {
            return;
        };
        let Some(cluster) = self.shared.cluster.clone() else {
            return;
        };
        cluster.send(
            &o.to,
            PeerMsg::Commit {
                sid,
                epoch: o.epoch,
            },
        );
        let now = self.now(ctx);
        let client = cluster.node(&o.to).map(|n| n.client);
        let Some(s) = self.table.get(sid) else {
            return;
        };
        let key = (s.tenant(), s.agent());
        let token = *s.resume_token();
        let caps = s.caps();
        let next_seq = s.next_seq();
        if let Some(client) = client {
            self.roam.tombs.insert(
                sid,
                Tomb {
                    node: o.to.clone(),
                    client,
                    epoch: o.epoch,
                    token_hash: token_hash(&token),
                    caps,
                    expires: now + self.shared.cfg.session.ttl_ms,
                },
            );
        }
        if let Some(conn) = self.attached.remove(&sid) {
            if caps & CAP_ROAM == 0 {
                // The client cannot follow: this node relays it to the target, resuming the
                // session there on its behalf (it has everything sent so far: nothing is
                // replayed), with the input it had not read yet.
                let mut first = Self::resume_on_behalf(sid, next_seq.wrapping_sub(1), token);
                if let Some(c) = self.clients.conns.get_mut(&conn) {
                    first.append(&mut c.inbuf);
                }
                self.relay_start(ctx, conn, sid, o.to.clone(), first, true);
            } else {
                if let Some(addr) = client {
                    let mut out = Vec::with_capacity(64);
                    encode_roam(&mut out, sid, next_seq, addr, &token);
                    self.clients.send(ctx, conn, &out, &Default::default());
                }
                self.drop_conn(ctx, conn, true);
            }
        }
        let mut msg = Vec::new();
        podlink::encode(&mut msg, sid, &PodMsg::Close(podlink::CloseReason::Roamed));
        self.link_send(ctx, key, &msg);
        self.forget_session(sid);
        self.roam.epochs.remove(&sid);
        let took = self.clock.us(ctx.now()).saturating_sub(o.started_us);
        let m = self.m();
        ShardMetrics::inc(&m.roams_completed, 1);
        m.roam.observe_us(took);
        info!(session = sid, to = %o.to, epoch = o.epoch, took_us = took, "session moved");
        if let Some(r) = o.reply {
            let _ = r.send(RoamOutcome::Moved {
                to: o.to,
                took_us: took,
            });
        }
        self.redrive_parked(ctx, sid);
    }

    /// Calls a move off before the flip: the session goes on here.
    fn roam_call_off(&mut self, ctx: &mut impl Context<ShardMsg>, sid: u32, why: String) {
        let Some(o) = self.roam.out.remove(&sid) else {
            return;
        };
        if o.phase != OutPhase::Exporting {
            if let Some(c) = self.shared.cluster.clone() {
                c.send(
                    &o.to,
                    PeerMsg::Abort {
                        sid,
                        epoch: o.epoch,
                    },
                );
            }
        }
        if let Some(s) = self.table.get(sid) {
            let key = (s.tenant(), s.agent());
            let mut msg = Vec::new();
            podlink::encode(&mut msg, sid, &PodMsg::Continue);
            self.link_send(ctx, key, &msg);
        }
        ShardMetrics::inc(&self.m().roams_called_off, 1);
        warn!(session = sid, to = %o.to, "move called off: {why}");
        if let Some(&c) = self.attached.get(&sid) {
            if !self.table.get(sid).is_some_and(|s| s.input_paused()) {
                self.clients.set_reading(ctx, c, true);
                self.redrive(ctx, c);
            }
        }
        self.arm(ctx, sid);
        self.redrive_parked(ctx, sid);
        if let Some(r) = o.reply {
            let _ = r.send(RoamOutcome::CalledOff(why));
        }
    }

    /// A move's deadline (or a warm copy's READY poll).
    pub(super) fn on_roam_timer(&mut self, ctx: &mut impl Context<ShardMsg>, sid: u32) {
        let now = self.now(ctx);
        if let Some(o) = self.roam.out.get(&sid) {
            if o.phase == OutPhase::Rechecking {
                if let Some(c) = self.shared.cluster.clone() {
                    c.locate(self.index, sid);
                }
                return;
            }
            if now >= o.deadline {
                let why = match o.phase {
                    OutPhase::Exporting => "the pod did not export the session in time",
                    OutPhase::Offered => "the target did not get ready in time",
                    _ => "the keeper did not answer in time",
                };
                if o.phase == OutPhase::Claiming {
                    // The flip may still land: settle it with the keeper, never guess.
                    if let Some(o) = self.roam.out.get_mut(&sid) {
                        o.phase = OutPhase::Rechecking;
                    }
                    if let Some(c) = self.shared.cluster.clone() {
                        c.locate(self.index, sid);
                    }
                    return;
                }
                self.roam_call_off(ctx, sid, why.into());
            }
            return;
        }
        let Some(w) = self.roam.warm.get(&sid) else {
            return;
        };
        if !w.ready_sent {
            if now >= w.deadline {
                let (from, epoch) = (w.from.clone(), w.epoch);
                if let Some(c) = self.shared.cluster.clone() {
                    c.send(
                        &from,
                        PeerMsg::Refuse {
                            sid,
                            epoch,
                            reason: "the agent pod did not come up".into(),
                        },
                    );
                }
                self.roam_drop_warm(ctx, sid, "pod link did not come up");
            } else {
                self.roam_ready(ctx, sid);
            }
            return;
        }
        if now >= w.deadline && !w.asked {
            if let Some(w) = self.roam.warm.get_mut(&sid) {
                w.asked = true;
            }
            if let Some(c) = self.shared.cluster.clone() {
                c.locate(self.index, sid);
            }
        }
    }

    fn roam_timer(&mut self, ctx: &mut impl Context<ShardMsg>, sid: u32, at: u64) {
        self.wheel.insert(at, Key::Roam(sid));
        self.schedule(ctx, at);
    }

    /// A RESUME for `sid`, which this shard does not serve: `Some(next)` when ClawRoam
    /// answers it (ROAM, waiting for a COMMIT or the keeper), `None` to refuse it as usual.
    pub(super) fn roam_resume(
        &mut self,
        ctx: &mut impl Context<ShardMsg>,
        conn: Client,
        sid: u32,
        token: Option<&[u8; 16]>,
    ) -> Option<super::Next> {
        let cluster = self.shared.cluster.clone()?;
        if self.roam.warm.contains_key(&sid) {
            self.roam_park(ctx, conn, sid);
            return Some(super::Next::Wait);
        }
        // A legacy RESUME carries no token to check (and nothing to send back in ROAM).
        let token = token?;
        let now = self.now(ctx);
        let th = token_hash(token);
        if let Some(t) = self.roam.tombs.get(&sid) {
            if t.expires > now && ct_eq(&t.token_hash, &th) {
                if t.caps & CAP_ROAM == 0 {
                    // The client cannot follow: relayed from here.
                    self.relays.pending = Some((conn, sid, t.node.clone()));
                    return Some(super::Next::Relay);
                }
                let (addr, node) = (t.client, t.node.clone());
                self.send_roam_and_close(ctx, conn, sid, addr, token);
                debug!(session = sid, to = %node, "RESUME redirected (tombstone)");
                return Some(super::Next::Stop);
            }
        }
        match self.roam.located.get(&sid).cloned() {
            Some((entry, until)) if until > now => {
                let e = entry.as_ref()?;
                if e.node == cluster.id() || !ct_eq(&e.token_hash, &th) {
                    return None;
                }
                if e.caps & CAP_ROAM == 0 {
                    self.relays.pending = Some((conn, sid, e.node.clone()));
                    return Some(super::Next::Relay);
                }
                let addr = cluster.node(&e.node).filter(|n| n.alive)?.client;
                self.send_roam_and_close(ctx, conn, sid, addr, token);
                debug!(session = sid, to = %e.node, "RESUME redirected (keeper)");
                Some(super::Next::Stop)
            }
            _ => {
                let first = !self.roam.parked.contains_key(&sid);
                self.roam_park(ctx, conn, sid);
                if first {
                    cluster.locate(self.index, sid);
                }
                Some(super::Next::Wait)
            }
        }
    }

    fn send_roam_and_close(
        &mut self,
        ctx: &mut impl Context<ShardMsg>,
        conn: Client,
        sid: u32,
        addr: SocketAddr,
        token: &[u8; 16],
    ) {
        let mut out = Vec::with_capacity(64);
        encode_roam(&mut out, sid, 0, addr, token);
        self.clients.send(ctx, conn, &out, &Default::default());
        ShardMetrics::inc(&self.m().roam_redirects, 1);
        self.drop_conn(ctx, conn, true);
    }

    pub(super) fn roam_park(&mut self, ctx: &mut impl Context<ShardMsg>, conn: Client, sid: u32) {
        self.clients.set_reading(ctx, conn, false);
        let v = self.roam.parked.entry(sid).or_default();
        if !v.contains(&conn) {
            v.push(conn);
        }
    }

    /// The connections whose RESUME waited on `sid` read it again.
    fn redrive_parked(&mut self, ctx: &mut impl Context<ShardMsg>, sid: u32) {
        let Some(conns) = self.roam.parked.remove(&sid) else {
            return;
        };
        for c in conns {
            if self
                .clients
                .conns
                .get(&c)
                .is_some_and(|x| x.state == ConnState::Handshake)
            {
                self.clients.set_reading(ctx, c, true);
                self.redrive(ctx, c);
            }
        }
    }

    /// Decodes what a connection had left unread.
    pub(super) fn redrive(&mut self, ctx: &mut impl Context<ShardMsg>, conn: Client) {
        if self
            .clients
            .conns
            .get(&conn)
            .is_some_and(|c| !c.inbuf.is_empty())
        {
            self.on_plaintext(ctx, conn, &[]);
        }
    }

    /// The directory names this node as `sid`'s holder at `epoch` unless it holds a newer one
    /// (queued on the keeper thread).
    fn directory_adopt(&self, sid: u32, epoch: u64) {
        if let (Some(c), Some(s)) = (self.shared.cluster.as_ref(), self.table.get(sid)) {
            c.keeper.adopted(
                sid,
                epoch,
                s.tenant(),
                s.agent(),
                s.caps(),
                token_hash(s.resume_token()),
            );
        }
    }

    /// A session ended here for good (not moved): the directory forgets it.
    pub(super) fn roam_ended(&mut self, sid: u32) {
        self.roam.epochs.remove(&sid);
        if let Some(c) = self.shared.cluster.as_ref() {
            c.keeper.ended(sid);
        }
    }

    /// A session was made here: the directory learns it.
    pub(super) fn roam_created(&mut self, sid: u32) {
        if let (Some(c), Some(s)) = (self.shared.cluster.as_ref(), self.table.get(sid)) {
            c.keeper.created(
                sid,
                s.tenant(),
                s.agent(),
                s.caps(),
                token_hash(s.resume_token()),
            );
        }
    }

    /// Old tombstones and keeper answers go (once a second, with the gauges).
    pub(super) fn roam_sweep(&mut self, now: u64) {
        self.roam.tombs.retain(|_, t| t.expires > now);
        self.roam.located.retain(|_, (_, until)| *until > now);
    }

    /// This shard's sessions for `clawtermctl sessions` and drain.
    pub(super) fn session_rows(&self) -> Vec<SessionRow> {
        self.table
            .iter()
            .filter(|s| !self.roam.warm.contains_key(&s.id()))
            .map(|s| {
                let key = (s.tenant(), s.agent());
                let exports = self.links.get(key).is_some_and(|l| {
                    l.is_up() && l.pod_version() >= podlink::codec::VERSION_MIGRATE
                });
                SessionRow {
                    id: s.id(),
                    tenant: s.tenant(),
                    agent: s.agent(),
                    state: match s.state() {
                        State::Attached => "attached",
                        State::Suspended => "suspended",
                        _ => "closing",
                    },
                    ring_bytes: s.ring().payload_bytes(),
                    movable: exports && !s.agent_closed(),
                    roaming: self.roam.out.contains_key(&s.id()),
                }
            })
            .collect()
    }
}

/// A ROAM frame (PROTOCOL.md §2.6) sending the client of `sid` to `addr` with its token. It
/// takes no SEQ of the session (the session's next frame is the target's): `seq` is the one
/// the session would use next, repeated by the target's RESUMED.
fn encode_roam(out: &mut Vec<u8>, sid: u32, seq: u32, addr: SocketAddr, token: &[u8; 16]) {
    proto::frame::encode_with(out, sid, seq, FrameType::Roam, 0, |o| {
        match addr.ip() {
            std::net::IpAddr::V4(v4) => {
                o.push(4);
                o.extend_from_slice(&v4.octets());
            }
            std::net::IpAddr::V6(v6) => {
                o.push(6);
                o.extend_from_slice(&v6.octets());
            }
        }
        o.extend_from_slice(&addr.port().to_be_bytes());
        o.extend_from_slice(token);
    });
}

/// Constant-time comparison of two token hashes.
fn ct_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    use subtle::ConstantTimeEq;
    a.ct_eq(b).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The ROAM frame this shard writes is what the client's parser reads.
    #[test]
    fn roam_frame_roundtrips() {
        let token = [7u8; 16];
        for addr in ["127.0.0.2:7220", "[::1]:9"] {
            let addr: SocketAddr = addr.parse().unwrap();
            let mut out = Vec::new();
            encode_roam(&mut out, 0x0100_0001, 5, addr, &token);
            let proto::Decoded::Frame(f, used) = proto::decode(&out, 65535).unwrap() else {
                panic!("incomplete")
            };
            assert_eq!(used, out.len());
            assert_eq!(f.ty, FrameType::Roam);
            let r = proto::Roam::parse(f.payload).unwrap();
            assert_eq!(SocketAddr::new(r.addr, r.port), addr);
            assert_eq!(r.roam_token, token);
        }
    }
}
