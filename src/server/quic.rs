//! QUIC on the UDP port: one `quinn-proto` endpoint per shard, driven sans-IO by the shard's
//! reactor, and one bidirectional stream per ClawTerm session carrying the same frames as TCP.
//!
//! # Keeping a connection on its shard
//!
//! Every shard binds its own SO_REUSEPORT UDP socket on the QUIC port. The server's connection
//! ids (CIDs) name the shard that owns the connection in their first byte ([`ShardCids`]); a
//! classic BPF program attached to the reuseport group ([`steering_program`]) reads the
//! destination CID of every datagram and hands it to that shard's socket. So when a client's
//! address or port changes (a phone moving from Wi-Fi to cellular, a NAT rebinding), its packets
//! still reach the shard holding the connection, and QUIC's own path validation carries the
//! connection over: no RESUME, no lost frame. A client's very first packets carry a
//! destination CID of its own choosing, which the same program maps to a shard too; the
//! `clawterm` client uses that to land a RESUME on the shard that owns its session (its first
//! CID byte is the session id's low byte, whose low bits name the owning shard). Without the
//! program (attaching refused), [`datagram_shard`] gives the same answer in user space and the
//! shard forwards the datagram through the owner's mailbox.
//!
//! The CID's first byte is visible on the wire. It tells an observer which core of this node
//! serves a connection, which the session id (also sent in clear over plaintext TCP) tells
//! anyway; the other seven bytes are random, so CIDs of one connection cannot be linked.
//!
//! # The stream as a connection
//!
//! The shard handler treats each bidirectional stream like a TCP connection: [`QuicShard`]
//! reports stream opened / data / closed as [`QEvent`]s and offers send, close, abort and
//! pause on a [`StreamKey`]. Output that the stream's flow control cannot take yet waits in a
//! per-stream queue (bounded in practice by the session's replay ring, as on TCP). The
//! connection's timers are filed in the shard's timer wheel by the handler.

use bytes::{Bytes, BytesMut};
use quinn_proto::{
    ConnectionHandle, ConnectionIdGenerator, DatagramEvent, Dir, Endpoint, EndpointConfig, Event,
    ReadError, StreamEvent, StreamId, VarInt, WriteError,
};
use rand::{RngCore, SeedableRng};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{debug, warn};

/// ALPN protocol name both sides must offer.
pub use crate::proto::ALPN;

/// Length of the server's connection ids.
pub const CID_LEN: usize = 8;

/// Application error code on streams and connections the server ends on purpose.
const CODE_CLOSED: u32 = 0;
/// Application error code when the server aborts a stream (handshake timeout, bad input).
const CODE_ABORTED: u32 = 1;

/// The mask that turns a CID's first byte into a shard index (next power of two minus one).
pub fn shard_mask(shards: usize) -> u8 {
    (shards.max(1).next_power_of_two() - 1).min(255) as u8
}

/// The shard a datagram belongs to by its destination CID, as [`steering_program`] computes
/// it: `None` when it names no shard (then any shard may take it).
pub fn datagram_shard(data: &[u8], shards: usize) -> Option<usize> {
    let first = *data.first()?;
    let byte = if first & 0x80 != 0 {
        // Long header: flags, version (4), DCID length, DCID.
        let len = *data.get(5)?;
        if len == 0 {
            return None;
        }
        *data.get(6)?
    } else {
        *data.get(1)?
    };
    let idx = (byte & shard_mask(shards)) as usize;
    (idx < shards).then_some(idx)
}

/// The reuseport steering program: picks the socket (= shard) from the first byte of the
/// destination CID, masked; out-of-range results and empty CIDs fall back to the kernel's hash.
pub fn steering_program(shards: usize) -> Vec<shards::BpfInsn> {
    // Classic BPF opcodes (linux/filter.h).
    const LDB_ABS: u16 = 0x30; // BPF_LD | BPF_B | BPF_ABS
    const JSET_K: u16 = 0x45; // BPF_JMP | BPF_JSET | BPF_K
    const JEQ_K: u16 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
    const JA: u16 = 0x05; // BPF_JMP | BPF_JA
    const AND_K: u16 = 0x54; // BPF_ALU | BPF_AND | BPF_K
    const RET_A: u16 = 0x16; // BPF_RET | BPF_A
    const RET_K: u16 = 0x06; // BPF_RET | BPF_K
    let i = |code, jt, jf, k| shards::BpfInsn { code, jt, jf, k };
    vec![
        /* 0 */ i(LDB_ABS, 0, 0, 0), // A = flags byte
        /* 1 */ i(JSET_K, 2, 0, 0x80), // long header? -> 4
        /* 2 */ i(LDB_ABS, 0, 0, 1), // short: A = DCID[0]
        /* 3 */ i(JA, 0, 0, 3), // -> 7
        /* 4 */ i(LDB_ABS, 0, 0, 5), // long: A = DCID length
        /* 5 */ i(JEQ_K, 3, 0, 0), // empty -> 9 (hash)
        /* 6 */ i(LDB_ABS, 0, 0, 6), // A = DCID[0]
        /* 7 */ i(AND_K, 0, 0, shard_mask(shards) as u32),
        /* 8 */ i(RET_A, 0, 0, 0),
        /* 9 */ i(RET_K, 0, 0, u32::MAX),
    ]
}

/// Connection ids for one shard: the shard index, then 7 random bytes.
pub struct ShardCids {
    shard: u8,
    rng: rand::rngs::StdRng,
}

impl ShardCids {
    pub fn new(shard: usize) -> ShardCids {
        ShardCids {
            shard: shard as u8,
            rng: rand::rngs::StdRng::from_entropy(),
        }
    }
}

impl ConnectionIdGenerator for ShardCids {
    fn generate_cid(&mut self) -> quinn_proto::ConnectionId {
        let mut b = [0u8; CID_LEN];
        b[0] = self.shard;
        self.rng.fill_bytes(&mut b[1..]);
        quinn_proto::ConnectionId::new(&b)
    }
    fn cid_len(&self) -> usize {
        CID_LEN
    }
    fn cid_lifetime(&self) -> Option<Duration> {
        None
    }
}

/// What every shard's endpoint shares: keys (so a stateless reset or address-validation token
/// minted by one shard is good on all) and the transport settings.
pub struct QuicShared {
    reset_key: Arc<ring::hmac::Key>,
    token_key: Arc<ring::hkdf::Prk>,
    transport: Arc<quinn_proto::TransportConfig>,
    shards: usize,
}

impl QuicShared {
    /// `idle_timeout_ms`: the QUIC idle timeout (the session's own idle timeout applies too).
    pub fn new(shards: usize, idle_timeout_ms: u64) -> Result<QuicShared, String> {
        let rng = ring::rand::SystemRandom::new();
        let mut seed = [0u8; 64];
        ring::rand::SecureRandom::fill(&rng, &mut seed)
            .map_err(|_| "no randomness for the QUIC keys".to_string())?;
        let reset_key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &seed[..32]);
        let token_key = ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, &[]).extract(&seed[32..]);
        let mut t = quinn_proto::TransportConfig::default();
        let idle = quinn_proto::IdleTimeout::try_from(Duration::from_millis(idle_timeout_ms))
            .map_err(|_| "QUIC idle timeout out of range".to_string())?;
        t.max_idle_timeout(Some(idle))
            // One stream per session; a client needs only a few at once.
            .max_concurrent_bidi_streams(VarInt::from_u32(16))
            .max_concurrent_uni_streams(VarInt::from_u32(0))
            // Terminal traffic: modest windows keep an idle connection small.
            .stream_receive_window(VarInt::from_u32(256 * 1024))
            .receive_window(VarInt::from_u32(1024 * 1024))
            .send_window(1024 * 1024)
            .datagram_receive_buffer_size(None);
        Ok(QuicShared {
            reset_key: Arc::new(reset_key),
            token_key: Arc::new(token_key),
            transport: Arc::new(t),
            shards,
        })
    }

    fn endpoint_config(&self, shard: usize) -> EndpointConfig {
        let mut c = EndpointConfig::new(self.reset_key.clone());
        c.cid_generator(move || Box::new(ShardCids::new(shard)));
        c
    }

    /// The QUIC server configuration for a TLS configuration (ALPN added).
    fn server_config(
        &self,
        tls: &Arc<rustls::ServerConfig>,
    ) -> Result<Arc<quinn_proto::ServerConfig>, String> {
        let mut tls = (**tls).clone();
        tls.alpn_protocols = vec![ALPN.to_vec()];
        tls.max_early_data_size = 0;
        let crypto = quinn_proto::crypto::rustls::QuicServerConfig::try_from(tls)
            .map_err(|e| format!("TLS configuration unusable for QUIC: {e}"))?;
        let mut sc = quinn_proto::ServerConfig::new(Arc::new(crypto), self.token_key.clone());
        sc.transport_config(self.transport.clone())
            .migration(true)
            // Bound the memory of connections that have not finished their handshake.
            .max_incoming(4096)
            .incoming_buffer_size(64 * 1024)
            .incoming_buffer_size_total(16 << 20);
        Ok(Arc::new(sc))
    }
}

/// The quinn stream id of a [`StreamKey`]'s `stream` (which came from one).
fn sid(x: u64) -> StreamId {
    StreamId::from(VarInt::from_u64(x).unwrap_or(VarInt::MAX))
}

/// A session stream: the connection (quinn handle + our generation) and the stream id.
#[derive(Copy, Clone, PartialEq, Eq, Hash, Debug)]
pub struct StreamKey {
    pub ch: u32,
    pub gen: u32,
    pub stream: u64,
}

/// What happened, for the shard handler.
pub enum QEvent {
    /// A client opened a stream (like an accepted TCP connection).
    Opened(StreamKey, SocketAddr),
    /// Bytes on a stream.
    Data(StreamKey, Bytes),
    /// The client finished or reset the stream, stopped reading it, or the connection is gone.
    Closed(StreamKey),
    /// A backpressured stream drained below the low watermark.
    Writable(StreamKey),
}

/// Output queued on a stream beyond which it counts as backpressured.
const HIGH_WATERMARK: usize = 1 << 20;
const LOW_WATERMARK: usize = 256 << 10;

#[derive(Default)]
struct QStream {
    /// Bytes its flow control could not take yet.
    pending: Vec<u8>,
    pending_off: usize,
    /// Finish the send side once `pending` is written.
    closing: bool,
    /// The handler wants data; when false, data waits in quinn (flow control holds the peer).
    paused: bool,
    /// Data arrived while paused.
    readable: bool,
    backpressured: bool,
}

impl QStream {
    fn queued(&self) -> usize {
        self.pending.len() - self.pending_off
    }
}

struct QConn {
    conn: quinn_proto::Connection,
    gen: u32,
    streams: HashMap<u64, QStream>,
    /// Needs transmit/timer attention.
    dirty: bool,
    /// The deadline filed with the handler (to avoid re-filing the same one).
    timer: Option<Instant>,
    /// Since when the connection carries no stream (it is then a handshake in progress, as
    /// far as limits go); `None` while it has one. Kept by [`QuicShard::sweep`].
    idle_since: Option<Instant>,
    /// Counted in [`QuicShard::streamless`].
    counted: bool,
}

/// Counters the shard publishes.
#[derive(Default, Debug, Clone, Copy)]
pub struct QuicCounts {
    pub connections: u64,
    pub streams: u64,
}

/// One shard's QUIC endpoint.
pub struct QuicShard {
    shard: usize,
    shared: Arc<QuicShared>,
    endpoint: Endpoint,
    conns: HashMap<usize, QConn>,
    next_gen: u32,
    dirty: Vec<usize>,
    events: Vec<QEvent>,
    buf: Vec<u8>,
    /// The TLS configuration the current server config was built from.
    tls_seen: Option<Arc<rustls::ServerConfig>>,
    /// Connections carrying no stream yet (kept exact between sweeps: a connection leaves the
    /// count when its first stream opens or when it goes away).
    streamless: usize,
    /// At most this many may exist: beyond, new connections are refused.
    max_streamless: usize,
}

impl QuicShard {
    /// `max_streamless`: connections that carry no session stream (handshakes, in effect)
    /// allowed at once on this shard.
    pub fn new(shard: usize, shared: Arc<QuicShared>, max_streamless: usize) -> QuicShard {
        let endpoint = Endpoint::new(Arc::new(shared.endpoint_config(shard)), None, false, None);
        QuicShard {
            shard,
            shared,
            endpoint,
            conns: HashMap::new(),
            next_gen: 1,
            dirty: Vec::new(),
            events: Vec::new(),
            buf: Vec::with_capacity(2048),
            tls_seen: None,
            streamless: 0,
            max_streamless: max_streamless.max(1),
        }
    }

    pub fn counts(&self) -> QuicCounts {
        QuicCounts {
            connections: self.conns.len() as u64,
            streams: self.conns.values().map(|c| c.streams.len() as u64).sum(),
        }
    }

    /// The shard a datagram belongs to, if not this one.
    pub fn foreign_shard(&self, data: &[u8]) -> Option<usize> {
        datagram_shard(data, self.shared.shards).filter(|&s| s != self.shard)
    }

    /// Events produced since the last call.
    pub fn take_events(&mut self, into: &mut Vec<QEvent>) {
        into.append(&mut self.events);
    }

    fn mark(&mut self, ch: usize) {
        if let Some(c) = self.conns.get_mut(&ch) {
            if !c.dirty {
                c.dirty = true;
                self.dirty.push(ch);
            }
        }
    }

    /// A datagram from `from`. `tls` is the TLS configuration in force (reloads are picked up
    /// by new connections); `allow` decides whether a new connection from that address may
    /// start (per-address limits).
    pub fn handle_datagram(
        &mut self,
        now: Instant,
        from: SocketAddr,
        data: &[u8],
        tls: &Arc<rustls::ServerConfig>,
        allow: impl FnOnce(SocketAddr) -> bool,
        send: &mut impl FnMut(SocketAddr, &[u8]),
    ) {
        // New connections use the certificate in force (reloads included).
        if let Err(e) = self.config_for(tls) {
            warn!(error = %e, "QUIC cannot accept connections");
        }
        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        let ev = self
            .endpoint
            .handle(now, from, None, None, BytesMut::from(data), &mut buf);
        match ev {
            None => {}
            Some(DatagramEvent::Response(t)) => send(t.destination, &buf[..t.size]),
            Some(DatagramEvent::ConnectionEvent(ch, cev)) => {
                if let Some(c) = self.conns.get_mut(&ch.0) {
                    c.conn.handle_event(cev);
                    self.mark(ch.0);
                    self.process(ch.0);
                }
            }
            Some(DatagramEvent::NewConnection(incoming)) => {
                if self.streamless >= self.max_streamless || !allow(incoming.remote_address()) {
                    let t = self.endpoint.refuse(incoming, &mut buf);
                    send(t.destination, &buf[..t.size]);
                } else {
                    match self.endpoint.accept(incoming, now, &mut buf, None) {
                        Ok((ch, conn)) => {
                            let gen = self.next_gen;
                            self.next_gen = self.next_gen.wrapping_add(1).max(1);
                            self.conns.insert(
                                ch.0,
                                QConn {
                                    conn,
                                    gen,
                                    streams: HashMap::new(),
                                    dirty: false,
                                    timer: None,
                                    idle_since: Some(now),
                                    counted: true,
                                },
                            );
                            self.streamless += 1;
                            self.mark(ch.0);
                            self.process(ch.0);
                        }
                        Err(e) => {
                            debug!(error = %e.cause, "QUIC accept failed");
                            if let Some(t) = e.response {
                                send(t.destination, &buf[..t.size]);
                            }
                        }
                    }
                }
            }
        }
        self.buf = buf;
    }

    /// Keeps the endpoint's server configuration in line with the TLS configuration in force.
    fn config_for(&mut self, tls: &Arc<rustls::ServerConfig>) -> Result<(), String> {
        if self.tls_seen.as_ref().is_some_and(|t| Arc::ptr_eq(t, tls)) {
            return Ok(());
        }
        self.tls_seen = Some(tls.clone());
        let sc = self.shared.server_config(tls)?;
        self.endpoint.set_server_config(Some(sc));
        Ok(())
    }

    /// Drains a connection's events: endpoint bookkeeping, new streams, readable data.
    fn process(&mut self, ch: usize) {
        let Some(c) = self.conns.get_mut(&ch) else {
            return;
        };
        while let Some(ev) = c.conn.poll_endpoint_events() {
            if let Some(cev) = self.endpoint.handle_event(ConnectionHandle(ch), ev) {
                c.conn.handle_event(cev);
            }
        }
        let gen = c.gen;
        while let Some(ev) = c.conn.poll() {
            match ev {
                Event::ConnectionLost { reason } => {
                    debug!(ch, %reason, "QUIC connection lost");
                    for (&stream, _) in c.streams.iter() {
                        self.events.push(QEvent::Closed(StreamKey {
                            ch: ch as u32,
                            gen,
                            stream,
                        }));
                    }
                    c.streams.clear();
                }
                Event::Stream(StreamEvent::Opened { dir: Dir::Bi }) => {
                    if c.counted {
                        c.counted = false;
                        self.streamless = self.streamless.saturating_sub(1);
                    }
                    while let Some(id) = c.conn.streams().accept(Dir::Bi) {
                        let key = StreamKey {
                            ch: ch as u32,
                            gen,
                            stream: u64::from(id),
                        };
                        c.streams.insert(key.stream, QStream::default());
                        self.events
                            .push(QEvent::Opened(key, c.conn.remote_address()));
                        Self::read_stream(c, key, &mut self.events);
                    }
                }
                Event::Stream(StreamEvent::Opened { dir: Dir::Uni }) => {
                    while let Some(id) = c.conn.streams().accept(Dir::Uni) {
                        let _ = c.conn.recv_stream(id).stop(VarInt::from_u32(CODE_ABORTED));
                    }
                }
                Event::Stream(StreamEvent::Readable { id }) => {
                    let key = StreamKey {
                        ch: ch as u32,
                        gen,
                        stream: u64::from(id),
                    };
                    if c.streams.contains_key(&key.stream) {
                        Self::read_stream(c, key, &mut self.events);
                    }
                }
                Event::Stream(StreamEvent::Writable { id }) => {
                    let key = StreamKey {
                        ch: ch as u32,
                        gen,
                        stream: u64::from(id),
                    };
                    Self::write_pending(c, key, &mut self.events);
                }
                // The client stopped reading: the stream is as good as closed.
                Event::Stream(StreamEvent::Stopped { id, .. })
                    if c.streams.remove(&u64::from(id)).is_some() =>
                {
                    self.events.push(QEvent::Closed(StreamKey {
                        ch: ch as u32,
                        gen,
                        stream: u64::from(id),
                    }));
                }
                // Our send side is done after a close: the stream is over.
                Event::Stream(StreamEvent::Finished { id })
                    if c.streams.get(&u64::from(id)).is_some_and(|s| s.closing) =>
                {
                    c.streams.remove(&u64::from(id));
                }
                _ => {}
            }
        }
        if c.conn.is_drained() {
            self.forget(ch);
        }
    }

    /// Reads what a stream has (unless paused): data and the end of the stream.
    fn read_stream(c: &mut QConn, key: StreamKey, events: &mut Vec<QEvent>) {
        let Some(st) = c.streams.get_mut(&key.stream) else {
            return;
        };
        if st.paused {
            st.readable = true;
            return;
        }
        st.readable = false;
        let id = sid(key.stream);
        let mut rs = c.conn.recv_stream(id);
        let mut chunks = match rs.read(true) {
            Ok(ch) => ch,
            Err(_) => return, // stopped by us already
        };
        let mut ended = false;
        loop {
            match chunks.next(usize::MAX) {
                Ok(Some(chunk)) => events.push(QEvent::Data(key, chunk.bytes)),
                Ok(None) => {
                    ended = true;
                    break;
                }
                Err(ReadError::Blocked) => break,
                Err(ReadError::Reset(_)) => {
                    ended = true;
                    break;
                }
            }
        }
        let _ = chunks.finalize();
        if ended && c.streams.remove(&key.stream).is_some() {
            events.push(QEvent::Closed(key));
        }
    }

    /// Writes queued output as far as flow control allows; finishes a closing stream.
    fn write_pending(c: &mut QConn, key: StreamKey, events: &mut Vec<QEvent>) {
        let Some(st) = c.streams.get_mut(&key.stream) else {
            return;
        };
        let id = sid(key.stream);
        while st.queued() > 0 {
            match c.conn.send_stream(id).write(&st.pending[st.pending_off..]) {
                Ok(n) => st.pending_off += n,
                Err(WriteError::Blocked) => break,
                Err(_) => {
                    st.pending.clear();
                    st.pending_off = 0;
                    break;
                }
            }
        }
        if st.queued() == 0 {
            st.pending = Vec::new();
            st.pending_off = 0;
            if st.closing {
                let _ = c.conn.send_stream(id).finish();
            }
        } else if st.pending_off > 64 * 1024 {
            st.pending.drain(..st.pending_off);
            st.pending_off = 0;
        }
        if st.backpressured && st.queued() < LOW_WATERMARK {
            st.backpressured = false;
            events.push(QEvent::Writable(key));
        }
    }

    fn stream(&mut self, key: StreamKey) -> Option<(&mut QConn, usize)> {
        let c = self.conns.get_mut(&(key.ch as usize))?;
        (c.gen == key.gen && c.streams.contains_key(&key.stream)).then_some((c, key.ch as usize))
    }

    /// Queues bytes on a stream; returns the bytes still waiting for flow control.
    pub fn send(&mut self, key: StreamKey, bytes: &[u8]) -> usize {
        let mut events = std::mem::take(&mut self.events);
        let mut left = 0;
        if let Some((c, ch)) = self.stream(key) {
            if let Some(st) = c.streams.get_mut(&key.stream) {
                if !st.closing {
                    st.pending.extend_from_slice(bytes);
                }
            }
            Self::write_pending(c, key, &mut events);
            if let Some(st) = c.streams.get_mut(&key.stream) {
                left = st.queued();
                if left > HIGH_WATERMARK {
                    st.backpressured = true;
                }
            }
            self.events = events;
            self.mark(ch);
            return left;
        }
        self.events = events;
        left
    }

    /// Bytes of a stream still queued here, not yet taken by the QUIC stack (its flow control
    /// holds what the client has not made room for). `None` for an unknown stream.
    pub fn unsent(&self, key: StreamKey) -> Option<usize> {
        self.conns
            .get(&(key.ch as usize))
            .filter(|c| c.gen == key.gen)
            .and_then(|c| c.streams.get(&key.stream))
            .map(|s| s.queued())
    }

    pub fn is_backpressured(&self, key: StreamKey) -> bool {
        self.conns
            .get(&(key.ch as usize))
            .filter(|c| c.gen == key.gen)
            .and_then(|c| c.streams.get(&key.stream))
            .is_some_and(|s| s.backpressured)
    }

    /// Flushes what is queued, then finishes the stream; stops reading it now.
    pub fn close(&mut self, key: StreamKey) {
        let mut events = std::mem::take(&mut self.events);
        if let Some((c, ch)) = self.stream(key) {
            let id = sid(key.stream);
            let _ = c.conn.recv_stream(id).stop(VarInt::from_u32(CODE_CLOSED));
            if let Some(st) = c.streams.get_mut(&key.stream) {
                st.closing = true;
            }
            Self::write_pending(c, key, &mut events);
            self.events = events;
            self.mark(ch);
            return;
        }
        self.events = events;
    }

    /// Drops queued output and resets the stream both ways.
    pub fn abort(&mut self, key: StreamKey) {
        if let Some((c, ch)) = self.stream(key) {
            let id = sid(key.stream);
            let _ = c.conn.recv_stream(id).stop(VarInt::from_u32(CODE_ABORTED));
            let _ = c.conn.send_stream(id).reset(VarInt::from_u32(CODE_ABORTED));
            c.streams.remove(&key.stream);
            self.mark(ch);
        }
    }

    /// Pauses or resumes delivering a stream's data (flow control holds the client meanwhile).
    pub fn set_reading(&mut self, key: StreamKey, on: bool) {
        let mut events = std::mem::take(&mut self.events);
        if let Some((c, ch)) = self.stream(key) {
            let mut read_now = false;
            if let Some(st) = c.streams.get_mut(&key.stream) {
                st.paused = !on;
                read_now = on && st.readable;
            }
            if read_now {
                Self::read_stream(c, key, &mut events);
            }
            self.events = events;
            self.mark(ch);
            return;
        }
        self.events = events;
    }

    pub fn peer(&self, key: StreamKey) -> Option<SocketAddr> {
        self.conns
            .get(&(key.ch as usize))
            .filter(|c| c.gen == key.gen)
            .map(|c| c.conn.remote_address())
    }

    /// A timer filed for `ch` fired.
    pub fn on_timeout(&mut self, ch: u32, gen: u32, now: Instant) {
        let ch = ch as usize;
        let Some(c) = self.conns.get_mut(&ch) else {
            return;
        };
        if c.gen != gen {
            return;
        }
        c.timer = None;
        if c.conn.poll_timeout().is_some_and(|t| t <= now) {
            c.conn.handle_timeout(now);
        }
        self.mark(ch);
        self.process(ch);
    }

    /// Sends what the dirty connections have to send and reports their next deadlines
    /// (`arm(ch, gen, deadline)`) so the handler files them in its timer wheel.
    pub fn flush(
        &mut self,
        now: Instant,
        send: &mut impl FnMut(SocketAddr, &[u8]),
        arm: &mut impl FnMut(u32, u32, Instant),
    ) {
        let mut buf = std::mem::take(&mut self.buf);
        while let Some(ch) = self.dirty.pop() {
            // Transmitting can produce endpoint events (new CIDs) and more work.
            self.process(ch);
            let Some(c) = self.conns.get_mut(&ch) else {
                continue;
            };
            c.dirty = false;
            loop {
                buf.clear();
                match c.conn.poll_transmit(now, 1, &mut buf) {
                    Some(t) => send(t.destination, &buf[..t.size]),
                    None => break,
                }
            }
            match c.conn.poll_timeout() {
                Some(t) if c.timer != Some(t) => {
                    c.timer = Some(t);
                    arm(ch as u32, c.gen, t);
                }
                Some(_) => {}
                None => c.timer = None,
            }
            if c.conn.is_drained() {
                self.forget(ch);
            }
        }
        self.buf = buf;
    }

    /// Closes connections that have carried no stream for `timeout` (a client that completes
    /// the QUIC handshake and then sends nothing, or keeps an empty connection alive with
    /// pings, would otherwise hold its state for good) and recounts the stream-less ones.
    /// Called about once a second.
    pub fn sweep(&mut self, now: Instant, timeout: Duration) {
        let mut streamless = 0;
        let mut expired = Vec::new();
        for (&ch, c) in self.conns.iter_mut() {
            c.counted = false;
            if !c.streams.is_empty() {
                c.idle_since = None;
                continue;
            }
            if c.conn.is_closed() {
                continue; // draining: its state goes within a few round trips
            }
            let since = *c.idle_since.get_or_insert(now);
            if now.saturating_duration_since(since) >= timeout {
                expired.push(ch);
            } else {
                c.counted = true;
                streamless += 1;
            }
        }
        self.streamless = streamless;
        for ch in expired {
            if let Some(c) = self.conns.get_mut(&ch) {
                debug!(ch, "QUIC connection without a session; closed");
                c.conn.close(
                    now,
                    VarInt::from_u32(CODE_CLOSED),
                    Bytes::from_static(b"no session"),
                );
            }
            self.mark(ch);
        }
    }

    /// Drops a drained connection's state.
    fn forget(&mut self, ch: usize) {
        if let Some(c) = self.conns.remove(&ch) {
            if c.counted {
                self.streamless = self.streamless.saturating_sub(1);
            }
        }
    }

    pub fn has_work(&self) -> bool {
        !self.dirty.is_empty() || !self.events.is_empty()
    }

    /// Closes every connection (server shutting down).
    pub fn close_all(&mut self, now: Instant) {
        let chs: Vec<usize> = self.conns.keys().copied().collect();
        for ch in chs {
            if let Some(c) = self.conns.get_mut(&ch) {
                c.conn.close(
                    now,
                    VarInt::from_u32(CODE_CLOSED),
                    Bytes::from_static(b"server shutting down"),
                );
                c.streams.clear();
            }
            self.mark(ch);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs the steering program the way the kernel does (classic BPF; a load past the end of
    /// the packet ends the program with 0).
    fn run(prog: &[shards::BpfInsn], pkt: &[u8]) -> u32 {
        let mut a: u32 = 0;
        let mut pc = 0usize;
        loop {
            let i = prog[pc];
            pc += 1;
            match i.code {
                0x30 => match pkt.get(i.k as usize) {
                    Some(&b) => a = b as u32,
                    None => return 0,
                },
                0x45 => pc += if a & i.k != 0 { i.jt } else { i.jf } as usize,
                0x15 => pc += if a == i.k { i.jt } else { i.jf } as usize,
                0x05 => pc += i.k as usize,
                0x54 => a &= i.k,
                0x16 => return a,
                0x06 => return i.k,
                c => panic!("opcode {c:#x} not expected"),
            }
        }
    }

    /// What the kernel does with the program's result: an index past the last socket falls
    /// back to the hash (`None` here).
    fn kernel_choice(prog: &[shards::BpfInsn], pkt: &[u8], shards: usize) -> Option<usize> {
        let r = run(prog, pkt) as usize;
        (r < shards).then_some(r)
    }

    #[test]
    fn program_and_user_space_agree_on_every_shape() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for shards in [1usize, 2, 3, 4, 5, 8, 16, 200] {
            let prog = steering_program(shards);
            for _ in 0..5000 {
                let len = rng.gen_range(0..40);
                let mut pkt: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
                if len > 5 && rng.gen_bool(0.3) {
                    pkt[5] = rng.gen_range(0..3); // short and empty DCIDs
                }
                let user = datagram_shard(&pkt, shards);
                let kernel = kernel_choice(&prog, &pkt, shards);
                // A packet too short to hold a CID: the kernel's program ends with 0 (shard
                // 0), user space says "anyone"; neither forwards it anywhere else.
                if pkt.is_empty()
                    || (pkt[0] & 0x80 == 0 && pkt.len() < 2)
                    || (pkt[0] & 0x80 != 0 && (pkt.len() < 6 || (pkt[5] != 0 && pkt.len() < 7)))
                {
                    assert_eq!(user, None);
                    continue;
                }
                assert_eq!(user, kernel, "{shards} shards, packet {pkt:02x?}");
            }
        }
    }

    #[test]
    fn server_cids_name_their_shard() {
        for shard in [0usize, 1, 5, 15] {
            let mut g = ShardCids::new(shard);
            let a = g.generate_cid();
            let b = g.generate_cid();
            assert_eq!(a.len(), CID_LEN);
            assert_ne!(a[..], b[..], "random beyond the first byte");
            // A short-header packet to that CID lands on the shard.
            let mut pkt = vec![0x40];
            pkt.extend_from_slice(&a[..]);
            pkt.extend_from_slice(&[0u8; 20]);
            assert_eq!(datagram_shard(&pkt, 16), Some(shard));
            assert_eq!(kernel_choice(&steering_program(16), &pkt, 16), Some(shard));
        }
    }
}
