//! QUIC for the worker: one `quinn-proto` client endpoint driven sans-IO over a few UDP
//! sockets (one per source address), one connection per session carrying one bidirectional
//! stream, as `clawterm_client::quic::QuicStream` does for a single session.
//!
//! The worker owns the sessions; this module owns the connections. The worker calls
//! [`QuicEp::connect`] for a session slot, [`QuicEp::write`] to queue stream bytes,
//! [`QuicEp::on_readable`] when a UDP socket is readable, [`QuicEp::on_timeouts`] when the
//! earliest QUIC timer ([`QuicEp::next_deadline`]) is due, and [`QuicEp::flush`] before it
//! sleeps; each of those returns what happened to sessions as [`QEv`]s, and
//! [`QuicEp::read`] hands over a session's received stream bytes.

use bytes::BytesMut;
use quinn_proto::{
    ClientConfig, Connection, ConnectionHandle, DatagramEvent, Dir, Endpoint, EndpointConfig,
    Event, StreamEvent, StreamId, VarInt, WriteError,
};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::io;
use std::net::{SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Instant;

/// Something that happened to a session's connection.
#[derive(Debug)]
pub enum QEv {
    /// The handshake finished and the stream is open: the session may send.
    Connected(usize),
    /// Stream bytes arrived (take them with [`QuicEp::read`]).
    Readable(usize),
    /// The connection ended (or the server ended the stream).
    Lost(usize, String),
}

struct QConn {
    conn: Connection,
    /// The session slot; `None` once the session let go of it (closing, waiting to drain).
    slot: Option<usize>,
    sock: usize,
    stream: Option<StreamId>,
    /// Received stream bytes not taken yet.
    inbox: Vec<u8>,
    /// Stream bytes flow control has not taken yet.
    pending: Vec<u8>,
    /// The deadline filed in the timer heap for this connection.
    filed: Option<Instant>,
    eof: bool,
}

pub struct QuicEp {
    ep: Endpoint,
    cfg: ClientConfig,
    server: SocketAddr,
    server_name: String,
    socks: Vec<UdpSocket>,
    conns: HashMap<ConnectionHandle, QConn>,
    /// Connections touched since the last flush (they may have something to send).
    dirty: Vec<ConnectionHandle>,
    timers: BinaryHeap<Reverse<(Instant, usize)>>,
    txbuf: Vec<u8>,
    rxbuf: Vec<u8>,
    /// Datagrams that could not be sent (full socket buffer): QUIC recovers them.
    pub send_drops: u64,
}

impl QuicEp {
    /// An endpoint with one UDP socket per address in `sources` (port chosen by the kernel).
    pub fn new(
        tls: Arc<rustls::ClientConfig>,
        server: SocketAddrV4,
        server_name: &str,
        sources: &[std::net::Ipv4Addr],
    ) -> Result<QuicEp, String> {
        let cfg = clawterm_client::quic::client_config(tls).map_err(|e| format!("QUIC {e}"))?;
        let mut socks = Vec::new();
        for ip in sources {
            let s = UdpSocket::bind(SocketAddrV4::new(*ip, 0))
                .map_err(|e| format!("UDP bind {ip}: {e}"))?;
            s.set_nonblocking(true)
                .map_err(|e| format!("UDP nonblocking: {e}"))?;
            set_buf(&s, libc::SO_RCVBUF, 4 << 20);
            set_buf(&s, libc::SO_SNDBUF, 4 << 20);
            socks.push(s);
        }
        Ok(QuicEp {
            ep: Endpoint::new(Arc::new(EndpointConfig::default()), None, false, None),
            cfg,
            server: SocketAddr::V4(server),
            server_name: server_name.to_string(),
            socks,
            conns: HashMap::new(),
            dirty: Vec::new(),
            timers: BinaryHeap::new(),
            txbuf: Vec::with_capacity(2048),
            rxbuf: vec![0u8; 65536],
            send_drops: 0,
        })
    }

    /// The UDP sockets' fds (register them with the worker's epoll).
    pub fn fds(&self) -> Vec<i32> {
        self.socks.iter().map(|s| s.as_raw_fd()).collect()
    }

    /// Starts a connection for session `slot` from socket `sock` (modulo the socket count).
    pub fn connect(&mut self, slot: usize, sock: usize) -> Result<ConnectionHandle, String> {
        let now = Instant::now();
        let (ch, conn) = self
            .ep
            .connect(now, self.cfg.clone(), self.server, &self.server_name)
            .map_err(|e| format!("QUIC connect: {e}"))?;
        self.conns.insert(
            ch,
            QConn {
                conn,
                slot: Some(slot),
                sock: sock % self.socks.len().max(1),
                stream: None,
                inbox: Vec::new(),
                pending: Vec::new(),
                filed: None,
                eof: false,
            },
        );
        self.dirty.push(ch);
        Ok(ch)
    }

    /// Queues stream bytes (sent on the next [`QuicEp::flush`]).
    pub fn write(&mut self, ch: ConnectionHandle, bytes: &[u8]) {
        let Some(q) = self.conns.get_mut(&ch) else {
            return;
        };
        q.pending.extend_from_slice(bytes);
        push_pending(q);
        self.dirty.push(ch);
    }

    /// Moves the received stream bytes of `ch` to the end of `into`.
    pub fn read(&mut self, ch: ConnectionHandle, into: &mut Vec<u8>) {
        if let Some(q) = self.conns.get_mut(&ch) {
            if into.is_empty() {
                std::mem::swap(into, &mut q.inbox);
            } else {
                into.extend_from_slice(&q.inbox);
                q.inbox.clear();
            }
        }
    }

    /// The session lets go of its connection: close it (`abort`: without a word, as a lost
    /// network would; the server only notices through its idle timer).
    pub fn close(&mut self, ch: ConnectionHandle, abort: bool) {
        if abort {
            if let Some(q) = self.conns.remove(&ch) {
                drop(q);
            }
            return;
        }
        if let Some(q) = self.conns.get_mut(&ch) {
            q.slot = None;
            let now = Instant::now();
            if let Some(id) = q.stream {
                // What the session wrote last (a DISCONNECT) goes out before the close.
                push_pending(q);
                let _ = q.conn.send_stream(id).finish();
                let sock = &self.socks[q.sock];
                transmit(
                    &mut q.conn,
                    sock,
                    &mut self.txbuf,
                    &mut self.send_drops,
                    now,
                );
            }
            q.conn.close(now, VarInt::from_u32(0), bytes::Bytes::new());
            self.dirty.push(ch);
        }
    }

    /// Receives what the UDP sockets hold.
    pub fn on_readable(&mut self, out: &mut Vec<QEv>) {
        let now = Instant::now();
        for k in 0..self.socks.len() {
            loop {
                let (n, from) = match self.socks[k].recv_from(&mut self.rxbuf) {
                    Ok(x) => x,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    // ICMP errors surface here; QUIC's timers decide.
                    Err(_) => continue,
                };
                let data = BytesMut::from(&self.rxbuf[..n]);
                let mut buf = std::mem::take(&mut self.txbuf);
                buf.clear();
                match self.ep.handle(now, from, None, None, data, &mut buf) {
                    Some(DatagramEvent::ConnectionEvent(ch, ev)) => {
                        if let Some(q) = self.conns.get_mut(&ch) {
                            q.conn.handle_event(ev);
                            self.dirty.push(ch);
                        }
                    }
                    Some(DatagramEvent::Response(t)) => {
                        let _ = self.socks[k].send_to(&buf[..t.size], t.destination);
                    }
                    Some(DatagramEvent::NewConnection(i)) => self.ep.ignore(i),
                    None => {}
                }
                self.txbuf = buf;
            }
        }
        self.process(out);
    }

    /// When [`QuicEp::on_timeouts`] must run next.
    pub fn next_deadline(&mut self) -> Option<Instant> {
        while let Some(Reverse((t, ch))) = self.timers.peek().copied() {
            let live = self
                .conns
                .get(&ConnectionHandle(ch))
                .is_some_and(|q| q.filed == Some(t));
            if live {
                return Some(t);
            }
            self.timers.pop();
        }
        None
    }

    /// Runs the QUIC timers that are due.
    pub fn on_timeouts(&mut self, out: &mut Vec<QEv>) {
        let now = Instant::now();
        while let Some(Reverse((t, ch))) = self.timers.peek().copied() {
            if t > now {
                break;
            }
            self.timers.pop();
            let ch = ConnectionHandle(ch);
            if let Some(q) = self.conns.get_mut(&ch) {
                if q.filed == Some(t) {
                    q.filed = None;
                    q.conn.handle_timeout(now);
                    self.dirty.push(ch);
                }
            }
        }
        self.process(out);
    }

    /// Sends what the touched connections have to send and files their timers.
    pub fn flush(&mut self, out: &mut Vec<QEv>) {
        self.process(out);
    }

    /// Events, then transmits and timers, of every touched connection.
    fn process(&mut self, out: &mut Vec<QEv>) {
        let now = Instant::now();
        let mut dirty = std::mem::take(&mut self.dirty);
        dirty.sort_unstable_by_key(|c| c.0);
        dirty.dedup();
        for ch in dirty.drain(..) {
            let Some(q) = self.conns.get_mut(&ch) else {
                continue;
            };
            while let Some(ev) = q.conn.poll_endpoint_events() {
                if let Some(cev) = self.ep.handle_event(ch, ev) {
                    q.conn.handle_event(cev);
                }
            }
            let mut lost = None;
            let mut readable = false;
            while let Some(ev) = q.conn.poll() {
                match ev {
                    Event::Connected if q.stream.is_none() => {
                        q.stream = q.conn.streams().open(Dir::Bi);
                        if q.stream.is_some() {
                            if let Some(s) = q.slot {
                                out.push(QEv::Connected(s));
                            }
                        } else {
                            lost = Some("the server allows no streams".to_string());
                        }
                    }
                    Event::ConnectionLost { reason } => {
                        lost = Some(format!("QUIC connection lost: {reason}"));
                    }
                    Event::Stream(StreamEvent::Readable { id }) if Some(id) == q.stream => {
                        readable = true;
                    }
                    Event::Stream(StreamEvent::Writable { id }) if Some(id) == q.stream => {
                        push_pending(q);
                    }
                    Event::Stream(StreamEvent::Stopped { id, .. }) if Some(id) == q.stream => {
                        lost = Some("the server stopped the stream".to_string());
                    }
                    _ => {}
                }
            }
            if q.stream.is_some() && read_stream(q) {
                readable = true;
            }
            if readable && !q.inbox.is_empty() {
                if let Some(s) = q.slot {
                    out.push(QEv::Readable(s));
                }
            }
            if q.eof && lost.is_none() {
                lost = Some("the server ended the stream".to_string());
            }
            let sock = &self.socks[q.sock];
            transmit(
                &mut q.conn,
                sock,
                &mut self.txbuf,
                &mut self.send_drops,
                now,
            );
            // Timer.
            match q.conn.poll_timeout() {
                Some(t) if q.filed != Some(t) => {
                    q.filed = Some(t);
                    self.timers.push(Reverse((t, ch.0)));
                }
                None => q.filed = None,
                _ => {}
            }
            if let Some(why) = lost {
                if let Some(s) = q.slot.take() {
                    out.push(QEv::Lost(s, why));
                }
            }
            if q.conn.is_drained() {
                self.conns.remove(&ch);
            }
        }
        self.dirty = dirty;
    }
}

/// Hands pending stream bytes to flow control.
fn push_pending(q: &mut QConn) {
    let Some(id) = q.stream else { return };
    let mut off = 0;
    while off < q.pending.len() {
        match q.conn.send_stream(id).write(&q.pending[off..]) {
            Ok(n) => off += n,
            Err(WriteError::Blocked) => break,
            Err(_) => {
                off = q.pending.len();
            }
        }
    }
    q.pending.drain(..off);
}

/// Moves what the stream holds into the inbox; whether anything came.
fn read_stream(q: &mut QConn) -> bool {
    let Some(id) = q.stream else { return false };
    if q.eof || q.conn.is_handshaking() {
        return false;
    }
    let before = q.inbox.len();
    q.eof = clawterm_client::quic::read_stream(&mut q.conn, id, &mut q.inbox);
    q.inbox.len() > before
}

/// Sends every datagram `conn` has ready from `sock`; counts the ones the socket refused.
fn transmit(
    conn: &mut quinn_proto::Connection,
    sock: &UdpSocket,
    txbuf: &mut Vec<u8>,
    drops: &mut u64,
    now: Instant,
) {
    loop {
        txbuf.clear();
        let Some(t) = conn.poll_transmit(now, 1, txbuf) else {
            break;
        };
        if sock.send_to(&txbuf[..t.size], t.destination).is_err() {
            *drops += 1;
        }
    }
}

fn set_buf(s: &UdpSocket, opt: i32, bytes: libc::c_int) {
    // SAFETY: valid pointer to a c_int of the given size, on our own socket.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            opt,
            &bytes as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}
