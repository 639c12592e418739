//! The node's part in a ClawRoam cluster (docs/CLUSTER.md): the keeper (session directory on
//! Redis), the peer link to the other nodes, and the routing of what they say to the shard
//! that owns each session. Shards never block on any of it: the keeper answers on its own
//! thread and the answer comes back as a shard message, like every peer message.

use super::config::ClusterConfig;
use super::shard::ShardMsg;
use crate::cluster::keeper::{self, Keeper, KeeperConfig, NodeInfo, NodeView};
use crate::cluster::peer::{PeerAuth, PeerMsg, Peers};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

/// How long a holder flip may take, queued behind others on the keeper thread included; after
/// it the keeper refuses it (its Lua checks the deadline) and the shard re-checks.
pub const CLAIM_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a lookup for a RESUME at the wrong node may take.
pub const LOOKUP_TIMEOUT: Duration = Duration::from_millis(500);

/// How a request to move a session ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RoamOutcome {
    /// The target holds it; its client was sent ROAM (or was away).
    Moved {
        to: String,
        /// Freeze to release, µs.
        took_us: u64,
    },
    /// Started and called off; the session goes on here with nothing lost.
    CalledOff(String),
    /// Not started (no such session, cannot move, target unknown).
    Refused(String),
}

/// One session, as `clawtermctl sessions` lists it.
#[derive(Clone, Debug)]
pub struct SessionRow {
    pub id: u32,
    pub tenant: u32,
    pub agent: u32,
    pub state: &'static str,
    pub ring_bytes: usize,
    /// Whether `clawtermctl drain` can move it (its client follows ROAM, its pod exports).
    pub movable: bool,
    /// Moving away right now.
    pub roaming: bool,
}

/// Where another node is reached.
#[derive(Clone, Debug)]
pub struct NodeAddrs {
    pub client: SocketAddr,
    pub peer: SocketAddr,
    pub alive: bool,
    pub sessions: u64,
}

/// The cluster as this node takes part in it.
pub struct ClusterNode {
    pub cfg: ClusterConfig,
    pub keeper: Keeper,
    peers: OnceLock<Peers>,
    remote: OnceLock<shards::Remote<ShardMsg>>,
    /// Other nodes by id, refreshed from the keeper every heartbeat by [`ClusterNode::refresh`].
    nodes: RwLock<HashMap<String, NodeAddrs>>,
    /// This node's client address (the advertised one, with the bound port when none given).
    client_addr: OnceLock<SocketAddr>,
    shards: usize,
}

impl ClusterNode {
    /// Joins the cluster: registers with the keeper (which gives this node its ordinal, the
    /// top byte of every session id it creates). `bound_port` is the TCP port clients use.
    pub fn join(
        cfg: ClusterConfig,
        shards: usize,
        bound_port: u16,
        cached_ordinal: Option<u8>,
    ) -> Result<Arc<ClusterNode>, String> {
        let client_addr = if cfg.advertise_port_given {
            cfg.advertise
        } else {
            SocketAddr::new(cfg.advertise.ip(), bound_port)
        };
        let keeper = Keeper::start(
            KeeperConfig {
                url: cfg.keeper.clone(),
                node: NodeInfo {
                    id: cfg.node_id.clone(),
                    client_addr: client_addr.to_string(),
                    peer_addr: cfg.peer_advertise.to_string(),
                    shards,
                },
                heartbeat: Duration::from_secs(1),
                prefix: "claw".into(),
                cached_ordinal,
            },
            Duration::from_secs(3),
        )
        .map_err(|e| format!("keeper {}: {e}", keeper::redact(&cfg.keeper)))?;
        let c = Arc::new(ClusterNode {
            cfg,
            keeper,
            peers: OnceLock::new(),
            remote: OnceLock::new(),
            nodes: RwLock::new(HashMap::new()),
            client_addr: OnceLock::new(),
            shards,
        });
        let _ = c.client_addr.set(client_addr);
        Ok(c)
    }

    /// Starts the peer link once the shards run (peer messages go to them).
    pub fn start_peers(
        self: &Arc<Self>,
        remote: shards::Remote<ShardMsg>,
    ) -> Result<SocketAddr, String> {
        let auth = PeerAuth::from_secret(&self.cfg.secret).map_err(|e| e.to_string())?;
        let _ = self.remote.set(remote);
        let me = Arc::downgrade(self);
        let on_msg: crate::cluster::peer::OnMsg = Arc::new(move |from: &str, msg: PeerMsg| {
            if let Some(me) = me.upgrade() {
                me.on_peer(from, msg);
            }
        });
        let peers = Peers::start(self.cfg.peer_bind, self.cfg.node_id.clone(), auth, on_msg)
            .map_err(|e| format!("peer link on {}: {e}", self.cfg.peer_bind))?;
        let addr = peers.local_addr();
        let _ = self.peers.set(peers);
        let _ = self.refresh();
        Ok(addr)
    }

    /// This node's id.
    pub fn id(&self) -> &str {
        &self.cfg.node_id
    }

    /// Where clients reach this node.
    pub fn client_addr(&self) -> SocketAddr {
        self.client_addr
            .get()
            .copied()
            .unwrap_or(self.cfg.advertise)
    }

    /// The shard of this node that keeps session `sid` (its live copy, a warm copy or a
    /// tombstone): the id's shard bits, modulo this node's shard count (a session that roamed
    /// in from a node with more shards still has one home).
    pub fn home(&self, sid: u32) -> usize {
        home(sid, self.shards)
    }

    /// Another node's addresses, from the last refresh.
    pub fn node(&self, id: &str) -> Option<NodeAddrs> {
        let g = match self.nodes.read() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        g.get(id).cloned()
    }

    /// The node table as last refreshed (id, addresses).
    pub fn nodes_cached(&self) -> Vec<(String, NodeAddrs)> {
        let g = match self.nodes.read() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        g.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    /// Re-reads the nodes from the keeper (a blocking call: admin and the refresher thread
    /// only, never a shard).
    pub fn refresh(&self) -> Result<Vec<NodeView>, keeper::KeeperError> {
        let views = self.keeper.nodes(Duration::from_secs(1))?;
        let mut map = HashMap::new();
        for v in &views {
            let (Ok(client), Ok(peer)) = (v.client_addr.parse(), v.peer_addr.parse()) else {
                continue;
            };
            map.insert(
                v.id.clone(),
                NodeAddrs {
                    client,
                    peer,
                    alive: v.alive,
                    sessions: v.sessions,
                },
            );
        }
        let mut g = match self.nodes.write() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        *g = map;
        Ok(views)
    }

    /// Sends `msg` to node `to` on the peer link; false when it cannot go (unknown node, link
    /// down or full): the caller calls its hand-over off.
    pub fn send(&self, to: &str, msg: PeerMsg) -> bool {
        let Some(peers) = self.peers.get() else {
            return false;
        };
        // A node the table does not know yet may still have a link to us (it connected
        // first): the answer goes on that link.
        let addr = self
            .node(to)
            .map_or(SocketAddr::from(([0, 0, 0, 0], 0)), |n| n.peer);
        peers.send(to, addr, msg)
    }

    /// Asks the keeper to flip `sid`'s holder to `to` at `epoch` (from `epoch - 1`); the
    /// answer reaches shard `shard` as [`ShardMsg::RoamClaimed`].
    pub fn claim(&self, shard: usize, sid: u32, epoch: u64, to: &str) {
        let remote = self.remote.get().cloned();
        self.keeper.claim(
            sid,
            epoch - 1,
            to,
            epoch,
            CLAIM_TIMEOUT,
            Box::new(move |result| {
                if let Some(r) = remote {
                    r.send(shard, ShardMsg::RoamClaimed { sid, epoch, result });
                }
            }),
        );
    }

    /// Asks the keeper where `sid` lives; the answer reaches shard `shard` as
    /// [`ShardMsg::Located`] (`Ok(None)`: not in the directory; `Err`: no answer).
    pub fn locate(&self, shard: usize, sid: u32) {
        let remote = self.remote.get().cloned();
        self.keeper.lookup(
            sid,
            LOOKUP_TIMEOUT,
            Box::new(move |answer| {
                if let Some(r) = remote {
                    r.send(shard, ShardMsg::Located { sid, answer });
                }
            }),
        );
    }

    /// A peer's message: to the shard that keeps its session.
    fn on_peer(&self, from: &str, msg: PeerMsg) {
        let shard = match &msg {
            PeerMsg::Migrate { sid, .. }
            | PeerMsg::Ready { sid, .. }
            | PeerMsg::Refuse { sid, .. }
            | PeerMsg::Commit { sid, .. }
            | PeerMsg::Abort { sid, .. }
            | PeerMsg::RelayOpen { sid, .. } => self.home(*sid),
            PeerMsg::RelayData { stream, .. } | PeerMsg::RelayClose { stream } => {
                super::shard::relay_route(*stream, self.keeper.ordinal(), self.shards)
            }
            _ => return, // liveness is the link's own business
        };
        if let Some(r) = self.remote.get() {
            r.send(
                shard,
                ShardMsg::Peer {
                    from: from.to_string(),
                    msg,
                },
            );
        }
    }

    /// Keeps the node table fresh and this node's load published, until the node goes.
    pub fn spawn_refresher(self: &Arc<Self>, sessions: impl Fn() -> u64 + Send + 'static) {
        let me = Arc::downgrade(self);
        let _ = std::thread::Builder::new()
            .name("cluster".into())
            .spawn(move || loop {
                std::thread::sleep(Duration::from_secs(1));
                let Some(c) = me.upgrade() else { return };
                c.keeper.set_load(sessions());
                if let Err(e) = c.refresh() {
                    tracing::debug!("cluster: node table not refreshed: {e}");
                }
            });
    }

    /// Leaves the cluster: the peer link closes and the node's keeper record goes — unless
    /// `handed_over` (a live upgrade: the new process is this node now and keeps the record).
    pub fn leave(&self, handed_over: bool) {
        if let Some(p) = self.peers.get() {
            p.shutdown();
        }
        self.keeper.stop(!handed_over);
    }
}

/// Session `sid`'s home shard among `shards` (see [`ClusterNode::home`]).
pub fn home(sid: u32, shards: usize) -> usize {
    let bits = usize::BITS - (shards.max(1) - 1).leading_zeros();
    ((sid & ((1u32 << bits) - 1)) as usize) % shards.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::IdSpace;

    /// A session keeps one home on every node: its own shard where it was made, and a shard
    /// in range on a node with fewer or more shards.
    #[test]
    fn home_is_the_owner_shard_and_always_in_range() {
        for shards in [1usize, 2, 3, 4, 7, 16] {
            for shard in 0..shards {
                let sp = IdSpace::new(shard, shards).with_node(3);
                for r in [1u32, 77, 0xFFFF_FFFF, 123_456] {
                    if let Some(id) = sp.make(r) {
                        assert_eq!(home(id, shards), shard);
                        for other in [1usize, 2, 3, 5, 8] {
                            assert!(home(id, other) < other);
                        }
                    }
                }
            }
        }
    }
}
