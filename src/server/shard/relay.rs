//! ClawRoam relay (PROTOCOL.md §2.6): a client that cannot follow ROAM stays connected where
//! it is, and that node (the "anchor") relays its bytes to the node that holds its session, over
//! the peer link. Two roles:
//!
//! * **Anchor** (this node holds the client's connection): the connection is
//!   [`ConnState::Relayed`]; what the client sends (decrypted, when TLS) goes to the holder as
//!   RELAY_DATA, what the holder sends comes back and is written to the client. It starts when a
//!   RESUME for a session held elsewhere comes from a client without ROAM (the RESUME goes first,
//!   as is), or when a session whose client cannot follow ROAM moves away (the anchor resumes
//!   it at the target on the client's behalf, and drops the target's RESUMED: for the client the
//!   session never stopped).
//! * **Holder** (this node holds the session): the relayed stream is a client connection like
//!   any other ([`Client::Peer`]), fed by RELAY_OPEN / RELAY_DATA.
//!
//! A stream id names both ends: `anchor ordinal (8) | anchor shard (8) | counter (16) | session
//! id (32)`, so each node routes a stream's messages to the right shard with no table
//! ([`route`]). Relay has no flow control across nodes in this version (the anchor queues what
//! its client does not read yet); its cost is measured in docs/BENCHMARKS.md.

use super::clients::Written;
use super::{Client, ConnState, ShardHandler, ShardMsg};
use crate::cluster::peer::PeerMsg;
use crate::proto::{self, Decoded, FrameType, Resume};
use crate::session::table::IdMap;
use shards::Context;
use std::net::SocketAddr;
use tracing::debug;

/// The shard of this node (of `shards`) that handles relay stream `stream`: the anchor's own
/// shard if this node (ordinal `me`) is the anchor, else the session's home shard.
pub fn route(stream: u64, me: u8, shards: usize) -> usize {
    if (stream >> 56) as u8 == me {
        ((stream >> 48) & 0xFF) as usize % shards.max(1)
    } else {
        super::super::cluster::home(stream as u32, shards)
    }
}

/// The relay state of a shard, both roles.
#[derive(Default)]
pub(super) struct Relays {
    /// Anchor: stream → (the client's connection, the holder's node).
    anchored: IdMap<u64, (Client, String)>,
    /// Anchor: connection → stream.
    by_conn: IdMap<Client, u64>,
    /// Anchor: streams whose holder's first frame (the RESUMED the anchor asked for) is
    /// dropped, with the bytes of it received so far.
    swallow: IdMap<u64, Vec<u8>>,
    /// Awaiting `Next::Relay` in `process`: the connection, session and holder of a RESUME
    /// that is to be relayed.
    pub(super) pending: Option<(Client, u32, String)>,
    counter: u16,
}

impl Relays {
    /// Relayed connections this shard anchors.
    pub(super) fn anchored(&self) -> usize {
        self.by_conn.len()
    }
}

impl ShardHandler {
    /// Anchor: turns `conn` (taken off its handshake or its session) into a relay to `node` for
    /// session `sid`; `first` goes to the holder first (the client's RESUME and what followed
    /// it, or a RESUME made on the client's behalf). `swallow`: drop the holder's first frame.
    pub(super) fn relay_start(
        &mut self,
        ctx: &mut impl Context<ShardMsg>,
        conn: Client,
        sid: u32,
        node: String,
        first: Vec<u8>,
        swallow: bool,
    ) {
        let Some(cluster) = self.shared.cluster.clone() else {
            self.clients.abort(ctx, conn);
            return;
        };
        let ordinal = cluster.keeper.ordinal();
        self.relays.counter = self.relays.counter.wrapping_add(1);
        let stream = (u64::from(ordinal) << 56)
            | ((self.index as u64 & 0xFF) << 48)
            | (u64::from(self.relays.counter) << 32)
            | u64::from(sid);
        match self.clients.conns.get_mut(&conn) {
            Some(c) => {
                if c.state == ConnState::Handshake {
                    self.pending_handshakes -= 1;
                }
                c.state = ConnState::Relayed;
                c.inbuf.clear();
            }
            None => return,
        }
        self.relays.anchored.insert(stream, (conn, node.clone()));
        self.relays.by_conn.insert(conn, stream);
        if swallow {
            self.relays.swallow.insert(stream, Vec::new());
        }
        let ok = cluster.send(
            &node,
            PeerMsg::RelayOpen {
                stream,
                sid,
                bytes: first,
            },
        );
        super::super::metrics::ShardMetrics::inc(&self.m().relays_opened, 1);
        debug!(session = sid, %node, stream, "relaying a client to the session's holder");
        if ok {
            self.clients.set_reading(ctx, conn, true);
        } else {
            self.drop_conn(ctx, conn, true);
        }
    }

    /// Anchor: bytes from a relayed client go to the holder as they are.
    pub(super) fn relay_forward(
        &mut self,
        ctx: &mut impl Context<ShardMsg>,
        conn: Client,
        data: &[u8],
    ) {
        let Some(&stream) = self.relays.by_conn.get(&conn) else {
            return;
        };
        let Some((_, node)) = self.relays.anchored.get(&stream) else {
            return;
        };
        let ok = self.shared.cluster.as_ref().is_some_and(|c| {
            c.send(
                node,
                PeerMsg::RelayData {
                    stream,
                    bytes: data.to_vec(),
                },
            )
        });
        if !ok {
            // The holder is out of reach: the client reconnects and resumes.
            self.drop_conn(ctx, conn, true);
        }
    }

    /// Anchor: the relay of `conn` ends here (the client left, or it is closed): the holder is
    /// told. Called from `drop_conn`.
    pub(super) fn relay_conn_gone(&mut self, conn: Client) {
        let Some(stream) = self.relays.by_conn.remove(&conn) else {
            return;
        };
        self.relays.swallow.remove(&stream);
        if let Some((_, node)) = self.relays.anchored.remove(&stream) {
            if let Some(c) = self.shared.cluster.as_ref() {
                c.send(&node, PeerMsg::RelayClose { stream });
            }
        }
    }

    /// Relay traffic from a peer node: RELAY_OPEN / RELAY_DATA / RELAY_CLOSE, as holder or as
    /// anchor.
    pub(super) fn on_relay_msg(
        &mut self,
        ctx: &mut impl Context<ShardMsg>,
        from: String,
        msg: PeerMsg,
    ) {
        match msg {
            PeerMsg::RelayOpen { stream, bytes, .. } => {
                // Holder: a new client connection, relayed.
                let conn = Client::Peer(stream);
                if self.clients.conns.contains_key(&conn) || !self.admit(ctx, conn, false) {
                    if let Some(c) = self.shared.cluster.as_ref() {
                        c.send(&from, PeerMsg::RelayClose { stream });
                    }
                    return;
                }
                let peer = self
                    .shared
                    .cluster
                    .as_ref()
                    .and_then(|c| c.node(&from))
                    .map_or(SocketAddr::from(([0, 0, 0, 0], 0)), |n| n.client);
                self.clients.peers.insert(stream, from);
                let now_us = self.clock.us(ctx.now());
                self.client_opened(ctx, conn, peer, None, now_us, true);
                self.on_plaintext(ctx, conn, &bytes);
            }
            PeerMsg::RelayData { stream, bytes } => {
                let conn = Client::Peer(stream);
                if self.clients.peers.get(&stream).is_some_and(|n| *n == from) {
                    if self.clients.conns.contains_key(&conn) {
                        self.on_plaintext(ctx, conn, &bytes);
                    }
                    return;
                }
                // Anchor: output for the client.
                self.relay_back(ctx, stream, &from, bytes);
            }
            PeerMsg::RelayClose { stream } => {
                if self.clients.peers.get(&stream).is_some_and(|n| *n == from) {
                    self.clients.peers.remove(&stream);
                    self.conn_lost(ctx, Client::Peer(stream), false);
                    return;
                }
                let Some((conn, node)) = self.relays.anchored.get(&stream).cloned() else {
                    return;
                };
                if node == from {
                    self.relays.by_conn.remove(&conn);
                    self.relays.anchored.remove(&stream);
                    self.relays.swallow.remove(&stream);
                    self.drop_conn(ctx, conn, true);
                }
            }
            _ => {}
        }
    }

    /// Anchor: what the holder sent for a relayed client, written to it (the RESUMED the
    /// anchor asked for on the client's behalf dropped first).
    fn relay_back(
        &mut self,
        ctx: &mut impl Context<ShardMsg>,
        stream: u64,
        from: &str,
        bytes: Vec<u8>,
    ) {
        let Some((conn, node)) = self.relays.anchored.get(&stream).cloned() else {
            return;
        };
        if node != from {
            return;
        }
        let mut out = bytes;
        if let Some(mut pending) = self.relays.swallow.remove(&stream) {
            pending.extend_from_slice(&out);
            match proto::decode(&pending, usize::from(u16::MAX)) {
                Ok(Decoded::NeedMore(_)) => {
                    self.relays.swallow.insert(stream, pending);
                    return;
                }
                Ok(Decoded::Frame(f, used)) => {
                    if f.ty != FrameType::Resumed {
                        // Refused (the session ended meanwhile): the client gets it as is.
                        out = pending;
                    } else {
                        out = pending[used..].to_vec();
                    }
                }
                Err(_) => out = pending,
            }
        }
        if !out.is_empty() {
            self.clients.send(ctx, conn, &out, &Written::default());
        }
    }

    /// A RESUME made on a client's behalf, for a session moving away with a client that
    /// cannot follow ROAM: it asks for nothing to be replayed beyond `last_seq` (everything
    /// before went over this connection).
    pub(super) fn resume_on_behalf(sid: u32, last_seq: u32, token: [u8; 16]) -> Vec<u8> {
        let mut out = Vec::with_capacity(48);
        proto::frame::encode_with(&mut out, sid, 0, FrameType::Resume, 0, |o| {
            Resume::Full {
                session_id: sid,
                last_seq,
                token,
            }
            .encode(o)
        });
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each end finds a stream's shard from its id alone.
    #[test]
    fn streams_route_to_the_anchor_shard_or_the_session_home() {
        let sid = 0x0500_0003u32;
        let stream = (7u64 << 56) | (1u64 << 48) | (9u64 << 32) | u64::from(sid);
        assert_eq!(route(stream, 7, 2), 1, "anchor: its own shard");
        assert_eq!(route(stream, 5, 4), 3, "holder: the session's home");
        assert_eq!(route(stream, 5, 2), 1);
    }
}
