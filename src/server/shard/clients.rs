//! The shard's client connections and their transports, behind one interface: a TCP
//! connection of the runtime (plaintext or TLS 1.3), a QUIC stream of this shard, or a QUIC
//! stream another shard holds and relays here. The router above never matches on the
//! transport: it sends, closes, aborts, pauses and asks about delivery through [`Clients`],
//! which counts what it sends where it sends it.

use super::super::metrics::{Metrics, ShardMetrics};
use super::super::quic::{QuicShard, StreamKey};
use super::ShardMsg;
use crate::proto::ErrorCode;
use crate::session::table::IdMap;
use shards::{ConnId, Context};
use std::net::SocketAddr;
use std::sync::Arc;

/// A client connection: a TCP connection of the runtime, a QUIC stream of this shard, or a
/// QUIC stream that another shard holds and relays.
#[derive(Copy, Clone, PartialEq, Eq, Hash, Debug)]
pub enum Client {
    Tcp(ConnId),
    Quic(StreamKey),
    Relay {
        shard: u16,
        key: StreamKey,
    },
    /// A client connected to another node of the cluster, relayed here over the peer link
    /// (ClawRoam; `relay.rs`): the stream id.
    Peer(u64),
}

#[derive(Copy, Clone, PartialEq, Eq, Debug)]
pub(super) enum ConnState {
    /// Waiting for CONNECT or RESUME.
    Handshake,
    /// Bound to a session.
    Bound(u32),
    /// Relayed to the node that holds its session (ClawRoam anchor; `relay.rs`): its bytes
    /// are not decoded here.
    Relayed,
}

pub(super) struct Conn {
    pub(super) state: ConnState,
    /// A partial frame (allocated only while one is pending).
    pub(super) inbuf: Vec<u8>,
    pub(super) peer: SocketAddr,
    /// Accepted at, in µs on this shard's clock (handshake and resume latency).
    pub(super) accepted_us: u64,
    /// Handed over from another shard (a cross-shard resume).
    pub(super) adopted: bool,
    /// TLS state (None on a plaintext port).
    pub(super) tls: Option<Box<rustls::ServerConnection>>,
    /// WebSocket state (None but on the WebSocket port; `websocket.rs`).
    pub(super) ws: Option<Box<WsConn>>,
}

/// A connection of the WebSocket port: its HTTP request, then its WebSocket.
#[derive(Debug)]
pub struct WsConn {
    pub(super) phase: WsPhase,
}

#[derive(Debug)]
pub(super) enum WsPhase {
    /// The request head so far.
    Http(Vec<u8>),
    /// Upgraded: ClawTerm frames travel in binary messages.
    Open(crate::server::ws::frames::WsIn),
    /// Answered (a page, a refusal) or closed: nothing more is read or sent.
    Done,
}

impl WsConn {
    pub(super) fn new() -> Box<WsConn> {
        Box::new(WsConn {
            phase: WsPhase::Http(Vec::new()),
        })
    }
}

/// The frames in a buffer of client bytes, counted by whoever encoded them.
#[derive(Default)]
pub(super) struct Written {
    /// Whole frames.
    pub(super) frames: u64,
    /// The codes of the ERROR frames among them.
    pub(super) errors: Vec<ErrorCode>,
}

impl Written {
    pub(super) fn clear(&mut self) {
        self.frames = 0;
        self.errors.clear();
    }
}

/// The shard's client connections, by [`Client`], with what their transports need.
pub(super) struct Clients {
    /// Each connection's handshake or session binding, partial frame and TLS state.
    pub(super) conns: IdMap<Client, Conn>,
    /// The QUIC endpoint of this shard (None without QUIC).
    pub(super) quic: Option<QuicShard>,
    /// Streams of this shard relayed to the shard that owns their session.
    pub(super) relays: IdMap<StreamKey, usize>,
    /// Streams other nodes relay here ([`Client::Peer`]): the anchor node of each.
    pub(super) peers: IdMap<u64, String>,
    /// The cluster, for [`Client::Peer`] output.
    cluster: Option<Arc<super::super::cluster::ClusterNode>>,
    /// Decrypted bytes of the TLS connection being read (reused).
    plain: Vec<u8>,
    /// TLS records being written (reused).
    tls_out: Vec<u8>,

    metrics: Arc<Metrics>,
    shard: usize,
}

impl Clients {
    pub(super) fn new(
        shard: usize,
        metrics: Arc<Metrics>,
        quic: Option<QuicShard>,
        cluster: Option<Arc<super::super::cluster::ClusterNode>>,
    ) -> Clients {
        Clients {
            conns: IdMap::default(),
            quic,
            relays: IdMap::default(),
            peers: IdMap::default(),
            cluster,
            plain: Vec::new(),
            tls_out: Vec::new(),
            metrics,
            shard,
        }
    }

    /// Queues bytes (already encrypted on TLS) on a client connection.
    fn transport_send(&mut self, ctx: &mut impl Context<ShardMsg>, conn: Client, bytes: &[u8]) {
        match conn {
            Client::Tcp(id) => {
                ctx.send(id, bytes);
            }
            Client::Quic(k) => {
                if let Some(q) = self.quic.as_mut() {
                    q.send(k, bytes);
                }
            }
            Client::Relay { shard, key } => ctx.send_to_shard(
                shard as usize,
                ShardMsg::RelayOut {
                    key,
                    bytes: bytes.to_vec(),
                },
            ),
            Client::Peer(stream) => {
                if let (Some(node), Some(c)) = (self.peers.get(&stream), self.cluster.as_ref()) {
                    // A lost peer link ends the stream there (its anchor closes the client,
                    // which resumes); nothing to do here but let the session's timers run.
                    let _ = c.send(
                        node,
                        crate::cluster::peer::PeerMsg::RelayData {
                            stream,
                            bytes: bytes.to_vec(),
                        },
                    );
                }
            }
        }
    }

    /// A relayed stream of another node ends here: its anchor closes the client.
    fn peer_close(&mut self, stream: u64) {
        if let (Some(node), Some(c)) = (self.peers.remove(&stream), self.cluster.as_ref()) {
            let _ = c.send(&node, crate::cluster::peer::PeerMsg::RelayClose { stream });
        }
    }

    /// Sends client bytes (`written`: the frames they hold, as their encoder counted them),
    /// counting frames, bytes and ERROR codes as they go out.
    pub(super) fn send(
        &mut self,
        ctx: &mut impl Context<ShardMsg>,
        conn: Client,
        bytes: &[u8],
        written: &Written,
    ) {
        let m = &self.metrics.shards[self.shard];
        ShardMetrics::inc(&m.frames_out, written.frames);
        for code in &written.errors {
            m.error(*code as u16);
        }
        ShardMetrics::inc(&m.bytes_out, bytes.len() as u64);
        self.send_framed(ctx, conn, bytes, true);
    }

    /// Sends `bytes` on `conn`'s transport with one lookup of the connection: in one binary
    /// message on an upgraded WebSocket when `ws_frame` (nothing before the upgrade or after
    /// the close), then encrypted on TLS.
    fn send_framed(
        &mut self,
        ctx: &mut impl Context<ShardMsg>,
        conn: Client,
        bytes: &[u8],
        ws_frame: bool,
    ) {
        let mut hdr = ([0u8; 10], 0);
        let tls = match self.conns.get_mut(&conn) {
            Some(c) => {
                match &c.ws {
                    Some(ws) if ws_frame && matches!(ws.phase, WsPhase::Open(_)) => {
                        hdr = crate::server::ws::frames::binary_header(bytes.len());
                    }
                    Some(_) if ws_frame => return,
                    _ => {}
                }
                match c.tls.as_mut() {
                    Some(tls) => {
                        use std::io::Write;
                        // The plaintext buffer is unbounded by default; this cannot fail.
                        let _ = tls.writer().write_all(&hdr.0[..hdr.1]);
                        let _ = tls.writer().write_all(bytes);
                        true
                    }
                    None => false,
                }
            }
            None => false,
        };
        if tls {
            self.tls_flush(ctx, conn);
        } else {
            if hdr.1 > 0 {
                self.transport_send(ctx, conn, &hdr.0[..hdr.1]);
            }
            self.transport_send(ctx, conn, bytes);
        }
    }

    /// Sends bytes as they are on the connection's transport: encrypted on TLS, not framed
    /// on WebSocket (an HTTP response, a WebSocket control frame).
    pub(super) fn send_raw(
        &mut self,
        ctx: &mut impl Context<ShardMsg>,
        conn: Client,
        bytes: &[u8],
    ) {
        self.send_framed(ctx, conn, bytes, false);
    }

    /// Sends whatever TLS records the connection has pending (handshake, alerts, data).
    fn tls_flush(&mut self, ctx: &mut impl Context<ShardMsg>, conn: Client) {
        let Some(tls) = self.conns.get_mut(&conn).and_then(|c| c.tls.as_mut()) else {
            return;
        };
        let mut out = std::mem::take(&mut self.tls_out);
        out.clear();
        while tls.wants_write() {
            if tls.write_tls(&mut out).is_err() {
                break;
            }
        }
        if !out.is_empty() {
            self.transport_send(ctx, conn, &out);
        }
        self.tls_out = out;
    }

    /// Closes a client connection after flushing what is queued.
    pub(super) fn close(&mut self, ctx: &mut impl Context<ShardMsg>, conn: Client) {
        match conn {
            Client::Tcp(id) => ctx.close(id),
            Client::Quic(k) => {
                if let Some(q) = self.quic.as_mut() {
                    q.close(k);
                }
            }
            Client::Relay { shard, key } => {
                ctx.send_to_shard(shard as usize, ShardMsg::RelayClose { key, abort: false })
            }
            Client::Peer(stream) => self.peer_close(stream),
        }
    }

    /// Closes a client connection now, dropping what is queued.
    pub(super) fn abort(&mut self, ctx: &mut impl Context<ShardMsg>, conn: Client) {
        match conn {
            Client::Tcp(id) => ctx.abort(id),
            Client::Quic(k) => {
                if let Some(q) = self.quic.as_mut() {
                    q.abort(k);
                }
            }
            Client::Relay { shard, key } => {
                ctx.send_to_shard(shard as usize, ShardMsg::RelayClose { key, abort: true })
            }
            Client::Peer(stream) => self.peer_close(stream),
        }
    }

    pub(super) fn set_reading(&mut self, ctx: &mut impl Context<ShardMsg>, conn: Client, on: bool) {
        match conn {
            Client::Tcp(id) => ctx.set_reading(id, on),
            Client::Quic(k) => {
                if let Some(q) = self.quic.as_mut() {
                    q.set_reading(k, on);
                }
            }
            Client::Relay { shard, key } => {
                ctx.send_to_shard(shard as usize, ShardMsg::RelayReading { key, on })
            }
            // No flow control across nodes in this version (`relay.rs`).
            Client::Peer(_) => {}
        }
    }

    /// Ciphertext from a TLS connection: decrypts it all and sends what the TLS state has to
    /// send (handshake messages, or the alert that explains a failure). Returns the plaintext
    /// (hand the buffer back with [`Clients::recycle`]) or why the connection failed.
    pub(super) fn decrypt(
        &mut self,
        ctx: &mut impl Context<ShardMsg>,
        conn: Client,
        data: &[u8],
    ) -> Result<Vec<u8>, String> {
        let mut plain = std::mem::take(&mut self.plain);
        plain.clear();
        let mut rd = data;
        let mut failed = None;
        if let Some(tls) = self.conns.get_mut(&conn).and_then(|c| c.tls.as_mut()) {
            while !rd.is_empty() {
                match tls.read_tls(&mut rd) {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e) => {
                        failed = Some(e.to_string());
                        break;
                    }
                }
                match tls.process_new_packets() {
                    Ok(st) => {
                        let n = st.plaintext_bytes_to_read();
                        if n > 0 {
                            use std::io::Read;
                            let at = plain.len();
                            plain.resize(at + n, 0);
                            if tls.reader().read_exact(&mut plain[at..]).is_err() {
                                plain.truncate(at);
                            }
                        }
                    }
                    Err(e) => {
                        failed = Some(e.to_string());
                        break;
                    }
                }
            }
        }
        // Handshake messages, or the alert that explains a failure.
        self.tls_flush(ctx, conn);
        match failed {
            Some(e) => {
                self.plain = plain;
                Err(e)
            }
            None => Ok(plain),
        }
    }

    /// Gives back the buffer [`Clients::decrypt`] returned, for the next read.
    pub(super) fn recycle(&mut self, plain: Vec<u8>) {
        self.plain = plain;
    }

    /// Whether `conn`'s output waits in a send queue above its high watermark (`None` when that
    /// cannot be known: a relayed stream).
    pub(super) fn backlogged(&self, ctx: &impl Context<ShardMsg>, conn: Client) -> Option<bool> {
        match conn {
            Client::Tcp(id) => Some(ctx.is_backpressured(id)),
            Client::Quic(k) => self.quic.as_ref().map(|q| q.is_backpressured(k)),
            Client::Relay { .. } | Client::Peer(_) => None,
        }
    }

    /// Whether everything sent on `conn` has reached the client (PROTOCOL.md §7.16): nothing
    /// queued here and, on TCP, nothing unsent or unacknowledged in the kernel. A relayed
    /// stream's delivery cannot be seen from here: never.
    pub(super) fn delivered(&self, ctx: &impl Context<ShardMsg>, conn: Client) -> bool {
        match conn {
            Client::Tcp(id) => ctx.unsent(id) == Some(0),
            Client::Quic(k) => self.quic.as_ref().is_some_and(|q| q.unsent(k) == Some(0)),
            Client::Relay { .. } | Client::Peer(_) => false,
        }
    }

    /// Bytes from the shard that owns a relayed stream's session, for its client.
    pub(super) fn relayed_send(&mut self, key: StreamKey, bytes: &[u8]) {
        if let (true, Some(q)) = (self.relays.contains_key(&key), self.quic.as_mut()) {
            q.send(key, bytes);
        }
    }

    /// The owning shard closes (flushing) or aborts a relayed stream.
    pub(super) fn relayed_close(&mut self, key: StreamKey, abort: bool) {
        if self.relays.remove(&key).is_none() {
            return;
        }
        if let Some(q) = self.quic.as_mut() {
            if abort {
                q.abort(key);
            } else {
                q.close(key);
            }
        }
    }

    /// The owning shard pauses or resumes reading a relayed stream.
    pub(super) fn relayed_reading(&mut self, key: StreamKey, on: bool) {
        if let (true, Some(q)) = (self.relays.contains_key(&key), self.quic.as_mut()) {
            q.set_reading(key, on);
        }
    }
}
