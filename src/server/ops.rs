//! What `clawtermctl` asks a node through the admin endpoint: its sessions, the cluster's
//! nodes, moving one session (`roam`) and moving them all (`drain`). Runs on admin threads;
//! the shards are asked through their mailboxes, never locked.

use super::cluster::{RoamOutcome, SessionRow};
use super::shard::ShardMsg;
use super::Shared;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Time one move may take, end to end, before the operator is told it did not answer.
const ROAM_WAIT: Duration = Duration::from_secs(20);
/// Moves in flight at once during a drain.
pub const DRAIN_WINDOW: usize = 256;

/// The node's operations, for the admin endpoint.
pub struct Ops {
    shared: Arc<Shared>,
    remote: shards::Remote<ShardMsg>,
}

impl Ops {
    pub fn new(shared: Arc<Shared>, remote: shards::Remote<ShardMsg>) -> Ops {
        Ops { shared, remote }
    }

    /// Every session on this node.
    pub fn sessions(&self) -> Vec<SessionRow> {
        let mut rx = Vec::new();
        for i in 0..self.remote.shards() {
            let (tx, r) = crossbeam_channel::bounded(1);
            if self.remote.send(i, ShardMsg::Sessions(tx)) {
                rx.push(r);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut rows = Vec::new();
        for r in rx {
            if let Ok(v) = r.recv_deadline(deadline) {
                rows.extend(v);
            }
        }
        rows.sort_by_key(|r| r.id);
        rows
    }

    /// `GET /v1/sessions`.
    pub fn sessions_json(&self) -> Value {
        let node = self
            .shared
            .cluster
            .as_ref()
            .map(|c| c.id().to_string())
            .unwrap_or_default();
        let rows: Vec<Value> = self
            .sessions()
            .into_iter()
            .map(|r| {
                json!({
                    "id": format!("{:08x}", r.id),
                    "tenant": r.tenant,
                    "agent": r.agent,
                    "state": if r.roaming { "roaming" } else { r.state },
                    "node": node,
                    "ring_bytes": r.ring_bytes,
                    "movable": r.movable,
                })
            })
            .collect();
        json!({ "node": node, "sessions": rows })
    }

    /// `GET /v1/nodes`: the cluster as the keeper sees it.
    pub fn nodes_json(&self) -> Result<Value, String> {
        let c = self
            .shared
            .cluster
            .as_ref()
            .ok_or("this node is not in a cluster (no --keeper)")?;
        let views = c.refresh().map_err(|e| format!("keeper: {e}"))?;
        let nodes: Vec<Value> = views
            .into_iter()
            .map(|v| {
                json!({
                    "id": v.id,
                    "client": v.client_addr,
                    "peer": v.peer_addr,
                    "alive": v.alive,
                    "sessions": v.sessions,
                    "shards": v.shards,
                    "ordinal": v.ordinal,
                    "heartbeat_age_ms": v.heartbeat_age_ms,
                    "self": v.id == c.id(),
                })
            })
            .collect();
        Ok(json!({ "node": c.id(), "keeper_up": c.keeper.is_up(), "nodes": nodes }))
    }

    /// Starts moving `sid` to `to`; the receiver gets the outcome.
    fn start_roam(
        &self,
        sid: u32,
        to: &str,
        force: bool,
    ) -> crossbeam_channel::Receiver<RoamOutcome> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        let home = super::cluster::home(sid, self.remote.shards());
        let sent = self.remote.send(
            home,
            ShardMsg::RoamOut {
                sid,
                to: to.to_string(),
                force,
                reply: tx.clone(),
            },
        );
        if !sent {
            let _ = tx.send(RoamOutcome::Refused("the node is stopping".into()));
        }
        rx
    }

    /// `POST /v1/roam?id=ID&to=NODE[&force=1]`: moves one session and waits for the outcome.
    pub fn roam(&self, sid: u32, to: &str, force: bool) -> RoamOutcome {
        self.start_roam(sid, to, force)
            .recv_timeout(ROAM_WAIT)
            .unwrap_or_else(|_| RoamOutcome::CalledOff("no answer within 20 s".into()))
    }

    /// Picks where a drained session goes: `to` when given, else the live node (not this
    /// one) with the fewest sessions, counting what this drain already sent it.
    fn targets(&self, to: Option<&str>) -> Result<Vec<(String, u64)>, String> {
        let c = self
            .shared
            .cluster
            .as_ref()
            .ok_or("this node is not in a cluster (no --keeper)")?;
        // The keeper's view, or the last one this node had if the keeper is away (the moves
        // then need the keeper for their flips, and are called off without it).
        let alive: Vec<(String, u64)> = match c.refresh() {
            Ok(views) => views
                .into_iter()
                .filter(|v| v.alive && v.id != c.id())
                .filter(|v| to.is_none_or(|t| t == v.id))
                .map(|v| (v.id, v.sessions))
                .collect(),
            Err(e) => {
                tracing::warn!("drain: keeper unreachable ({e}); using the last node table");
                c.nodes_cached()
                    .into_iter()
                    .filter(|(id, n)| n.alive && id != c.id())
                    .filter(|(id, _)| to.is_none_or(|t| t == id))
                    .map(|(id, n)| (id, n.sessions))
                    .collect()
            }
        };
        if alive.is_empty() {
            return Err(match to {
                Some(t) => format!("node {t} is not a live node of the cluster"),
                None => "no other live node to drain to".into(),
            });
        }
        Ok(alive)
    }

    /// `POST /v1/drain[?to=NODE][&force=1][&window=N]`: moves every session off this node,
    /// `window` (at most [`DRAIN_WINDOW`]) at a time. `progress` gets one JSON line per second and the summary at the end;
    /// returns whether every session moved.
    pub fn drain(
        &self,
        to: Option<&str>,
        force: bool,
        window: usize,
        mut progress: impl FnMut(&Value) -> bool,
    ) -> Result<bool, String> {
        let window = window.clamp(1, DRAIN_WINDOW);
        let mut targets = self.targets(to)?;
        let rows = self.sessions();
        let total = rows.len();
        let started = Instant::now();
        let mut queue = rows
            .into_iter()
            .map(|r| r.id)
            .collect::<Vec<_>>()
            .into_iter();
        let mut inflight: Vec<(u32, crossbeam_channel::Receiver<RoamOutcome>)> = Vec::new();
        let (mut moved, mut failed) = (0usize, Vec::<Value>::new());
        let mut last = Instant::now();
        loop {
            while inflight.len() < window {
                let Some(sid) = queue.next() else { break };
                let Some(t) = targets.iter_mut().min_by_key(|t| t.1) else {
                    break;
                };
                t.1 += 1;
                let to = t.0.clone();
                inflight.push((sid, self.start_roam(sid, &to, force)));
            }
            if inflight.is_empty() {
                break;
            }
            let ready = {
                let mut sel = crossbeam_channel::Select::new();
                for (_, r) in &inflight {
                    sel.recv(r);
                }
                sel.ready_timeout(Duration::from_millis(250)).ok()
            };
            if let Some(i) = ready {
                let (sid, r) = inflight.swap_remove(i);
                match r.try_recv() {
                    Ok(RoamOutcome::Moved { .. }) => moved += 1,
                    Ok(RoamOutcome::CalledOff(why)) | Ok(RoamOutcome::Refused(why)) => {
                        failed.push(json!({ "id": format!("{sid:08x}"), "why": why }))
                    }
                    Err(crossbeam_channel::TryRecvError::Empty) => inflight.push((sid, r)),
                    Err(_) => failed.push(
                        json!({ "id": format!("{sid:08x}"), "why": "the shard did not answer" }),
                    ),
                }
            }
            if last.elapsed() >= Duration::from_secs(1) {
                last = Instant::now();
                let p = json!({
                    "progress": true,
                    "total": total,
                    "moved": moved,
                    "failed": failed.len(),
                    "in_flight": inflight.len(),
                    "elapsed_s": started.elapsed().as_secs_f64(),
                });
                if !progress(&p) {
                    // The operator went away: the moves in flight finish, no new ones start.
                    queue = Vec::new().into_iter();
                }
            }
        }
        let secs = started.elapsed().as_secs_f64();
        let summary = json!({
            "summary": true,
            "total": total,
            "moved": moved,
            "failed": failed.len(),
            "failures": failed,
            "elapsed_s": secs,
            "per_second": if secs > 0.0 { moved as f64 / secs } else { 0.0 },
        });
        progress(&summary);
        Ok(summary["failed"].as_u64() == Some(0) && moved == total)
    }
}
