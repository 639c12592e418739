//! The client side of QUIC: one connection over a UDP socket, driven sans-IO with
//! `quinn-proto`, carrying one bidirectional stream (one ClawTerm session).
//!
//! [`QuicStream`] can be used blocking ([`std::io::Read`]/[`std::io::Write`] with a read
//! timeout, like a `TcpStream`) or from an event loop: [`QuicStream::fd`] to poll,
//! [`QuicStream::next_timeout`] for the poll timeout, [`QuicStream::drive`] after either fires,
//! and the non-blocking [`QuicStream::try_read`]/[`QuicStream::try_write`].
//!
//! Connection migration: [`QuicStream::rebind`] moves the connection to a new local socket
//! (new address and/or port, as when a phone changes networks); the server validates the new
//! path and the stream carries on — no reconnect, no RESUME, nothing lost.
//!
//! Steering: when the stream will resume session `sid`, [`QuicStream::connect`] takes it and
//! makes the first byte of the initial destination connection id the session id's low byte, so
//! the server's reuseport program delivers the handshake to the shard that owns the session
//! (the other bytes are random, as RFC 9000 §7.2 requires).

use bytes::BytesMut;
use quinn_proto::{
    ClientConfig, Connection, ConnectionHandle, DatagramEvent, Dir, Endpoint, EndpointConfig,
    Event, ReadError, StreamEvent, StreamId, VarInt, WriteError,
};
use rand::RngCore;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clawterm_core::proto::ALPN;

/// Output the stream holds beyond what flow control lets through before `try_write` says
/// WouldBlock.
const MAX_PENDING: usize = 1 << 20;

/// A QUIC connection with one bidirectional stream.
pub struct QuicStream {
    sock: UdpSocket,
    endpoint: Endpoint,
    conn: Connection,
    ch: ConnectionHandle,
    stream: StreamId,
    /// Received stream bytes not read yet.
    inbox: Vec<u8>,
    inbox_off: usize,
    /// Bytes flow control has not taken yet.
    pending: Vec<u8>,
    /// The server finished or reset the stream (nothing more to read).
    eof: bool,
    /// The server stopped reading the stream (nothing more can be sent).
    stopped: bool,
    /// Why the connection ended, once it has.
    lost: Option<String>,
    /// The server closed the connection with code 0 (no error): its orderly end.
    orderly: bool,
    read_timeout: Option<Duration>,
    /// The connection's next timer, as of the last time it was driven.
    timer: Option<Instant>,
    txbuf: Vec<u8>,
    rxbuf: Vec<u8>,
}

/// The QUIC client configuration of every ClawTerm client (the library and loadgen): TLS with
/// the ClawTerm ALPN, no streams opened by the server, and a keep-alive every 15 s so NAT
/// bindings and the server's idle timer stay fresh even when the terminal is quiet.
pub fn client_config(tls: Arc<rustls::ClientConfig>) -> Result<ClientConfig, String> {
    let mut tls = (*tls).clone();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn_proto::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| format!("TLS config: {e}"))?;
    let mut cfg = ClientConfig::new(Arc::new(crypto));
    let mut transport = quinn_proto::TransportConfig::default();
    transport
        .max_concurrent_bidi_streams(VarInt::from_u32(0))
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .keep_alive_interval(Some(Duration::from_secs(15)));
    cfg.transport_config(Arc::new(transport));
    Ok(cfg)
}

fn err(kind: io::ErrorKind, msg: impl Into<String>) -> io::Error {
    io::Error::new(kind, msg.into())
}

/// Appends what stream `id` of `conn` has ready to `inbox`, in order. Returns `true` when the
/// stream has ended (finished or reset by the peer); a stream that cannot be read (not open
/// yet, stopped) adds nothing and returns `false`. Shared with loadgen's QUIC endpoint.
pub fn read_stream(conn: &mut Connection, id: StreamId, inbox: &mut Vec<u8>) -> bool {
    let mut rs = conn.recv_stream(id);
    let Ok(mut chunks) = rs.read(true) else {
        return false;
    };
    let mut ended = false;
    loop {
        match chunks.next(usize::MAX) {
            Ok(Some(c)) => inbox.extend_from_slice(&c.bytes),
            Ok(None) | Err(ReadError::Reset(_)) => {
                ended = true;
                break;
            }
            Err(ReadError::Blocked) => break,
        }
    }
    let _ = chunks.finalize();
    ended
}

impl QuicStream {
    /// Connects to `server` (TLS 1.3 with `tls`, verifying `server_name`), opens the stream and
    /// returns once the handshake is done, within `timeout`. `steer` is the session this
    /// stream will resume, if any (see the module docs). `local` is the address to bind
    /// (`None`: any, of the server's family).
    pub fn connect(
        server: SocketAddr,
        server_name: &str,
        tls: Arc<rustls::ClientConfig>,
        steer: Option<u32>,
        local: Option<SocketAddr>,
        timeout: Duration,
    ) -> io::Result<QuicStream> {
        let mut cfg = client_config(tls).map_err(|e| err(io::ErrorKind::InvalidInput, e))?;
        if let Some(sid) = steer {
            cfg.initial_dst_cid_provider(Arc::new(move || {
                let mut b = [0u8; 8];
                rand::thread_rng().fill_bytes(&mut b[1..]);
                b[0] = sid as u8;
                quinn_proto::ConnectionId::new(&b)
            }));
        }
        let local = local.unwrap_or_else(|| {
            if server.is_ipv4() {
                SocketAddr::from(([0, 0, 0, 0], 0))
            } else {
                SocketAddr::from(([0u16; 8], 0))
            }
        });
        let sock = UdpSocket::bind(local)?;
        sock.set_nonblocking(true)?;
        let mut endpoint = Endpoint::new(Arc::new(EndpointConfig::default()), None, false, None);
        let (ch, conn) = endpoint
            .connect(Instant::now(), cfg, server, server_name)
            .map_err(|e| err(io::ErrorKind::InvalidInput, format!("QUIC connect: {e}")))?;
        let mut q = QuicStream {
            sock,
            endpoint,
            conn,
            ch,
            stream: StreamId::from(VarInt::from_u32(0)),
            inbox: Vec::new(),
            inbox_off: 0,
            pending: Vec::new(),
            eof: false,
            stopped: false,
            lost: None,
            orderly: false,
            read_timeout: None,
            timer: None,
            txbuf: Vec::with_capacity(2048),
            rxbuf: vec![0u8; 65536],
        };
        let deadline = Instant::now() + timeout;
        while q.conn.is_handshaking() {
            if let Some(why) = &q.lost {
                return Err(err(io::ErrorKind::ConnectionRefused, why.clone()));
            }
            if Instant::now() >= deadline {
                return Err(err(
                    io::ErrorKind::TimedOut,
                    format!("no QUIC handshake with {server} within {timeout:?}"),
                ));
            }
            q.wait(deadline)?;
        }
        if let Some(why) = &q.lost {
            return Err(err(io::ErrorKind::ConnectionRefused, why.clone()));
        }
        q.stream = q
            .conn
            .streams()
            .open(Dir::Bi)
            .ok_or_else(|| err(io::ErrorKind::Other, "the server allows no streams"))?;
        Ok(q)
    }

    /// The socket to poll for readability.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.sock.local_addr()
    }

    /// The server address the connection currently uses.
    pub fn remote_addr(&self) -> SocketAddr {
        self.conn.remote_address()
    }

    /// When [`QuicStream::drive`] must run at the latest (QUIC timers), as of the last time
    /// the connection was driven or written to.
    pub fn next_timeout(&self) -> Option<Instant> {
        self.timer
    }

    /// Output waiting for flow control.
    pub fn pending_output(&self) -> usize {
        self.pending.len()
    }

    /// Receives what arrived, runs due timers, handles events, sends what is due. Never blocks.
    pub fn drive(&mut self) -> io::Result<()> {
        let now = Instant::now();
        loop {
            match self.sock.recv_from(&mut self.rxbuf) {
                Ok((n, from)) => {
                    let data = BytesMut::from(&self.rxbuf[..n]);
                    let mut buf = std::mem::take(&mut self.txbuf);
                    buf.clear();
                    match self.endpoint.handle(now, from, None, None, data, &mut buf) {
                        Some(DatagramEvent::ConnectionEvent(_, ev)) => self.conn.handle_event(ev),
                        Some(DatagramEvent::Response(t)) => {
                            let _ = self.sock.send_to(&buf[..t.size], t.destination);
                        }
                        Some(DatagramEvent::NewConnection(i)) => self.endpoint.ignore(i),
                        None => {}
                    }
                    self.txbuf = buf;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // ICMP errors (port unreachable) surface here: QUIC's timers decide.
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {}
                Err(e) => return Err(e),
            }
        }
        if self.conn.poll_timeout().is_some_and(|t| t <= now) {
            self.conn.handle_timeout(now);
        }
        self.process();
        self.flush_pending();
        self.transmit(now);
        Ok(())
    }

    fn process(&mut self) {
        while let Some(ev) = self.conn.poll_endpoint_events() {
            if let Some(cev) = self.endpoint.handle_event(self.ch, ev) {
                self.conn.handle_event(cev);
            }
        }
        while let Some(ev) = self.conn.poll() {
            match ev {
                Event::ConnectionLost { reason } => {
                    // The server closing the connection with code 0 (no error) is its orderly
                    // end, like a TCP FIN: read as end of stream (a server going away — a
                    // restart, a live upgrade — is then reconnected to at once).
                    if matches!(&reason, quinn_proto::ConnectionError::ApplicationClosed(c)
                        if c.error_code == quinn_proto::VarInt::from_u32(0))
                    {
                        self.orderly = true;
                    }
                    self.lost = Some(format!("QUIC connection lost: {reason}"));
                }
                Event::Stream(StreamEvent::Readable { id }) if id == self.stream => self.read(),
                Event::Stream(StreamEvent::Stopped { id, .. }) if id == self.stream => {
                    self.stopped = true;
                }
                _ => {}
            }
        }
        // Data can arrive with the events above or before we asked.
        self.read();
    }

    fn read(&mut self) {
        if self.eof || self.conn.is_handshaking() {
            return;
        }
        self.eof = read_stream(&mut self.conn, self.stream, &mut self.inbox);
    }

    fn flush_pending(&mut self) {
        let mut off = 0;
        while off < self.pending.len() {
            match self
                .conn
                .send_stream(self.stream)
                .write(&self.pending[off..])
            {
                Ok(n) => off += n,
                Err(WriteError::Blocked) => break,
                Err(_) => {
                    off = self.pending.len();
                    self.stopped = true;
                }
            }
        }
        self.pending.drain(..off);
    }

    fn transmit(&mut self, now: Instant) {
        let mut buf = std::mem::take(&mut self.txbuf);
        loop {
            buf.clear();
            let Some(t) = self.conn.poll_transmit(now, 1, &mut buf) else {
                break;
            };
            // A full socket buffer drops the datagram; QUIC's loss recovery resends it.
            let _ = self.sock.send_to(&buf[..t.size], t.destination);
        }
        self.txbuf = buf;
        self.timer = self.conn.poll_timeout();
    }

    /// Waits until the socket is readable, a QUIC timer is due or `until`, then drives.
    pub fn wait(&mut self, until: Instant) -> io::Result<()> {
        // Whatever is due goes out first (a new connection's first flight, for one).
        self.flush_pending();
        self.transmit(Instant::now());
        let now = Instant::now();
        let due = self.conn.poll_timeout().map_or(until, |t| t.min(until));
        let ms = due
            .saturating_duration_since(now)
            .as_micros()
            .div_ceil(1000);
        clawterm_poll::readable(self.sock.as_fd(), ms.min(i32::MAX as u128) as i32)?;
        self.drive()
    }

    /// Stream bytes, without blocking: `WouldBlock` when none are there, `Ok(0)` at the end of
    /// the stream, an error once the connection is lost.
    pub fn try_read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let have = self.inbox.len() - self.inbox_off;
        if have > 0 {
            let n = have.min(buf.len());
            buf[..n].copy_from_slice(&self.inbox[self.inbox_off..self.inbox_off + n]);
            self.inbox_off += n;
            if self.inbox_off == self.inbox.len() {
                self.inbox.clear();
                self.inbox_off = 0;
            }
            return Ok(n);
        }
        if self.eof {
            return Ok(0);
        }
        if let Some(why) = &self.lost {
            return Err(err(io::ErrorKind::ConnectionReset, why.clone()));
        }
        Err(io::ErrorKind::WouldBlock.into())
    }

    /// Queues bytes on the stream without blocking (`WouldBlock` once a megabyte waits for the
    /// server's flow control).
    pub fn try_write(&mut self, data: &[u8]) -> io::Result<usize> {
        if let Some(why) = &self.lost {
            return Err(err(io::ErrorKind::ConnectionReset, why.clone()));
        }
        if self.stopped {
            return Err(err(
                io::ErrorKind::BrokenPipe,
                "the server closed the stream",
            ));
        }
        let room = MAX_PENDING.saturating_sub(self.pending.len());
        if room == 0 {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = room.min(data.len());
        self.pending.extend_from_slice(&data[..n]);
        self.flush_pending();
        self.transmit(Instant::now());
        Ok(n)
    }

    /// Timeout for the blocking [`Read`] implementation (`None`: wait forever).
    pub fn set_read_timeout(&mut self, t: Option<Duration>) {
        self.read_timeout = t;
    }

    /// Moves the connection to a new local socket bound to `local` (connection migration).
    /// Returns the new local address.
    pub fn rebind(&mut self, local: SocketAddr) -> io::Result<SocketAddr> {
        let sock = UdpSocket::bind(local)?;
        sock.set_nonblocking(true)?;
        self.sock = sock;
        // Use a fresh connection id on the new path (RFC 9000 §9.5) and probe it.
        self.conn.local_address_changed();
        self.transmit(Instant::now());
        self.sock.local_addr()
    }

    /// Finishes the stream and closes the connection (best effort, does not wait).
    pub fn close(&mut self) {
        self.flush_pending();
        let _ = self.conn.send_stream(self.stream).finish();
        let now = Instant::now();
        self.transmit(now);
        self.conn
            .close(now, VarInt::from_u32(0), bytes::Bytes::new());
        self.transmit(now);
    }

    /// Why the connection ended, if it has.
    /// Whether the connection ended because the server closed it without an error (code 0):
    /// the counterpart of a TCP FIN.
    pub fn closed_orderly(&self) -> bool {
        self.orderly
    }

    pub fn lost(&self) -> Option<&str> {
        self.lost.as_deref()
    }
}

impl Read for QuicStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let deadline = self.read_timeout.map(|t| Instant::now() + t);
        loop {
            match self.try_read(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                r => return r,
            }
            let until = deadline.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            if Instant::now() >= until {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            self.wait(until)?;
        }
    }
}

impl Write for QuicStream {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        loop {
            match self.try_write(data) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let until = Instant::now() + Duration::from_millis(100);
                    self.wait(until)?;
                }
                r => return r,
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.pending.is_empty() {
            if Instant::now() >= deadline {
                return Err(err(io::ErrorKind::TimedOut, "QUIC flow control stuck"));
            }
            if let Some(why) = &self.lost {
                return Err(err(io::ErrorKind::ConnectionReset, why.clone()));
            }
            self.wait(Instant::now() + Duration::from_millis(100))?;
        }
        self.drive()
    }
}
