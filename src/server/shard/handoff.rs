//! Cross-shard hand-off: a RESUME that lands on a shard that does not own its session moves
//! there. A TCP connection moves with its TLS state (the runtime's `hand_off`); a QUIC stream
//! cannot leave its connection's shard, so its bytes are relayed to the owner and back
//! (`ShardMsg::Relay*`).

use super::super::quic::StreamKey;
use super::{Client, ShardHandler};
use shards::{ConnId, Context};
use std::net::SocketAddr;
use std::time::Instant;
use tracing::debug;

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
        /// Its WebSocket state (a connection of the WebSocket port), which moves with it.
        ws: Option<Box<super::clients::WsConn>>,
    },
    /// The pod registry saw a pod socket appear.
    PodAdded(u32, u32),
    /// The pod registry saw a pod socket disappear.
    PodRemoved(u32, u32),
    /// A QUIC datagram that arrived on the wrong shard (no steering program): its connection
    /// id names this one.
    Datagram { from: SocketAddr, bytes: Vec<u8> },
    /// A RESUME on a QUIC stream of shard `from` for a session of this shard: the stream stays
    /// where its connection is and its bytes are relayed (QUIC connections cannot move).
    RelayOpen {
        from: usize,
        key: StreamKey,
        peer: SocketAddr,
        /// The RESUME frame and what followed it.
        buffered: Vec<u8>,
        accepted_at: Instant,
    },
    /// More bytes from a relayed stream.
    RelayIn {
        from: usize,
        key: StreamKey,
        bytes: Vec<u8>,
    },
    /// A relayed stream ended on the shard that holds it.
    RelayGone { from: usize, key: StreamKey },
    /// Bytes for the client of a relayed stream.
    RelayOut { key: StreamKey, bytes: Vec<u8> },
    /// Close (flushing) or abort a relayed stream.
    RelayClose { key: StreamKey, abort: bool },
    /// Pause or resume reading a relayed stream.
    RelayReading { key: StreamKey, on: bool },
    /// A live upgrade begins: stop accepting, and from now on keep a RESUME for another
    /// shard's session where it is (that shard may be moving); the index goes back once no
    /// accept can follow.
    Quiesce(crossbeam_channel::Sender<usize>),
    /// A live upgrade: freeze and hand everything over (see `crate::upgrade`).
    Export(crossbeam_channel::Sender<crate::upgrade::ShardExport>),
    /// The new process serves: close what could not be handed over.
    Release,
    /// In the new process of a live upgrade: this shard's part of the hand-over (sessions,
    /// their journal, connections and links); the shard's index goes back on the channel
    /// once they are in place.
    TakeOver(Box<super::Restore>, crossbeam_channel::Sender<usize>),
    /// Every shard has its part: start accepting (the runtime started paused).
    Serve,
    /// Marks a connection leaving the runtime for another process.
    Moved,
    /// ClawRoam: move session `sid` to node `to` (`clawtermctl roam`, drain); the outcome
    /// goes back on `reply`.
    RoamOut {
        sid: u32,
        to: String,
        force: bool,
        reply: crossbeam_channel::Sender<crate::server::cluster::RoamOutcome>,
    },
    /// ClawRoam: a peer node's message about a session of this shard.
    Peer {
        from: String,
        msg: crate::cluster::peer::PeerMsg,
    },
    /// ClawRoam: the keeper's answer to a holder flip.
    RoamClaimed {
        sid: u32,
        epoch: u64,
        result: Result<crate::cluster::keeper::Claim, crate::cluster::keeper::KeeperError>,
    },
    /// ClawRoam: where the keeper says `sid` lives (`Ok(None)`: no record; `Err`: no answer).
    Located {
        sid: u32,
        answer: Result<Option<crate::cluster::keeper::Entry>, crate::cluster::keeper::KeeperError>,
    },
    /// This shard's sessions (`clawtermctl sessions`, drain).
    Sessions(crossbeam_channel::Sender<Vec<crate::server::cluster::SessionRow>>),
}

impl ShardHandler {
    /// A RESUME for a session of shard `owner`: a TCP connection moves there (with its TLS
    /// state); a QUIC stream cannot move with its connection, so its bytes are relayed to the
    /// owner from here. `buffered` is the RESUME frame and whatever followed it.
    pub(super) fn hand_over(
        &mut self,
        ctx: &mut impl Context<ShardMsg>,
        conn: Client,
        owner: usize,
        buffered: Vec<u8>,
    ) {
        let accepted_us = self.clients.conns.get(&conn).map_or(0, |c| c.accepted_us);
        let peer = self.clients.conns.get(&conn).map(|c| c.peer);
        let tls = self.clients.conns.get_mut(&conn).and_then(|c| c.tls.take());
        let ws = self.clients.conns.get_mut(&conn).and_then(|c| c.ws.take());
        self.drop_conn(ctx, conn, false);
        let accepted_at = self.clock.instant_us(accepted_us);
        match (conn, peer) {
            (Client::Tcp(id), _) => {
                debug!(to = owner, "resume handed off to the owning shard");
                ctx.hand_off(
                    id,
                    owner,
                    ShardMsg::Resume {
                        buffered,
                        accepted_at,
                        tls,
                        ws,
                    },
                );
            }
            (Client::Quic(key), Some(peer)) => {
                debug!(to = owner, "QUIC resume relayed to the owning shard");
                self.clients.relays.insert(key, owner);
                ctx.send_to_shard(
                    owner,
                    ShardMsg::RelayOpen {
                        from: self.index,
                        key,
                        peer,
                        buffered,
                        accepted_at,
                    },
                );
            }
            // A relayed stream always lands on its session's owner; anything else is refused.
            (c, _) => self.clients.abort(ctx, c),
        }
    }

    /// The relay of a QUIC stream between the shard that holds it and the shard that owns its
    /// session.
    pub(super) fn on_relay(&mut self, ctx: &mut impl Context<ShardMsg>, msg: ShardMsg) {
        match msg {
            ShardMsg::RelayOpen {
                from,
                key,
                peer,
                buffered,
                accepted_at,
            } => {
                let conn = Client::Relay {
                    shard: from as u16,
                    key,
                };
                if self.admit(ctx, conn, true) {
                    let accepted_us = self.clock.us(accepted_at);
                    self.client_opened(ctx, conn, peer, None, accepted_us, true);
                    self.on_plaintext(ctx, conn, &buffered);
                }
            }
            ShardMsg::RelayIn { from, key, bytes } => {
                let conn = Client::Relay {
                    shard: from as u16,
                    key,
                };
                if self.clients.conns.contains_key(&conn) {
                    self.on_client_bytes(ctx, conn, &bytes);
                }
            }
            ShardMsg::RelayGone { from, key } => {
                let conn = Client::Relay {
                    shard: from as u16,
                    key,
                };
                self.conn_lost(ctx, conn, false);
            }
            // The other side: this shard holds the stream, its session lives elsewhere.
            ShardMsg::RelayOut { key, bytes } => self.clients.relayed_send(key, &bytes),
            ShardMsg::RelayClose { key, abort } => self.clients.relayed_close(key, abort),
            ShardMsg::RelayReading { key, on } => self.clients.relayed_reading(key, on),
            _ => {}
        }
    }

    /// A TCP connection handed over by another shard (a cross-shard RESUME): it starts its
    /// handshake here with what the old shard had decoded (the RESUME and what followed it),
    /// then the bytes that arrived while it was in transit.
    pub(super) fn adopt(
        &mut self,
        ctx: &mut impl Context<ShardMsg>,
        conn: ConnId,
        peer: SocketAddr,
        unread: Vec<u8>,
        msg: ShardMsg,
    ) {
        let ShardMsg::Resume {
            buffered,
            accepted_at,
            tls,
            ws,
        } = msg
        else {
            ctx.abort(conn);
            return;
        };
        let client = Client::Tcp(conn);
        let accepted_us = self.clock.us(accepted_at);
        self.client_opened(ctx, client, peer, tls, accepted_us, true);
        if let Some(c) = self.clients.conns.get_mut(&client) {
            c.ws = ws;
        }
        self.on_plaintext(ctx, client, &buffered);
        if !unread.is_empty() && self.clients.conns.contains_key(&client) {
            shards::Handler::on_data(self, ctx, conn, &unread);
        }
    }
}
