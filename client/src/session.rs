//! Transport (plaintext TCP or TLS 1.3) over [`ClientCore`], with automatic reconnect: every
//! attempt opens a new TCP connection and, with TLS, runs a new handshake; the replay and
//! resend logic above it does not care which.
//!
//! [`Session::connect`] and [`Session::resume`] block until the session is attached (or
//! refused). After that nothing blocks: a reconnect attempt resolves the name, connects and
//! runs the TLS handshake on a helper thread, which hands the connection back (and wakes
//! [`Session::poll_fd`]); the RESUME/RESUMED exchange then runs non-blocking on the caller's
//! thread, driven by [`Session::try_recv`]. So an event loop keeps handling keys, signals and
//! window changes while the server is unreachable.

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use super::backoff::Backoff;
use super::core::{ClientCore, CoreEvent, Timers};
use super::creds::{unix_now, Credentials};
use super::transport::{as_rustls, explain, Conn, Target, TlsSetup, Transport};
use super::ClientError;

/// What [`Session::recv`] reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// Output from the agent, each byte exactly once and in order.
    Data(Vec<u8>),
    /// Output was lost while away (the server's replay ring overflowed).
    Gap,
    /// The connection is down (`attempt` 0: just lost; n: the n-th reconnect failed); the next
    /// attempt is in `retry_in`. Input sent meanwhile is queued and delivered after reconnect.
    Disconnected {
        reason: String,
        retry_in: Duration,
        attempt: u32,
    },
    /// A reconnect attempt starts now. It runs in the background: `try_recv` does not block
    /// meanwhile, and the outcome is a later `Reconnected` or `Disconnected`.
    Reconnecting { attempt: u32 },
    /// Attached again; queued input was resent.
    Reconnected { resent: usize },
    /// The session ended on the server (the agent closed it). Later calls return
    /// [`ClientError::Closed`].
    Ended,
}

/// Transport settings.
#[derive(Clone, Debug)]
pub struct Options {
    /// TCP connect timeout per address.
    pub connect_timeout: Duration,
    /// Bound on waiting for ACCEPT/RESUMED.
    pub handshake_timeout: Duration,
    /// Reconnect delays.
    pub backoff: Backoff,
    /// Keepalive and dead-connection timers.
    pub timers: Timers,
    /// Reconnect by itself after a loss (otherwise the loss is a [`ClientError::Unreachable`]).
    pub auto_reconnect: bool,
    /// Plaintext or TLS 1.3, for endpoints given as a bare `HOST:PORT`; an endpoint written
    /// `tls://…` or `tcp://…` (see [`Target`]) says it itself. Default: plaintext, for
    /// compatibility with servers run with `--insecure-plaintext`; the `clawterm` CLI defaults
    /// to TLS.
    pub transport: Transport,
    /// Offer ROAM (capability `0x04`, default on): when the session moves to another node of
    /// a cluster, follow it there. Off: the node this client connects to relays the session.
    pub follow_roam: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            connect_timeout: Duration::from_secs(5),
            handshake_timeout: Duration::from_secs(10),
            backoff: Backoff::default(),
            timers: Timers::default(),
            auto_reconnect: true,
            transport: Transport::Plaintext,
            follow_roam: true,
        }
    }
}

enum Link {
    Up(Conn),
    Down {
        retry_at: Instant,
        announced: bool,
    },
    /// A reconnect attempt's TCP connect (and TLS handshake) runs on a helper thread.
    Connecting(Connecting),
    /// Connected; CONNECT or RESUME sent, the answer is read without blocking.
    Handshaking(Handshake),
    Closed,
}

/// A connection being opened on a helper thread.
struct Connecting {
    result: mpsc::Receiver<Result<Conn, ClientError>>,
    /// Becomes readable (EOF) when the helper is done: what [`Session::poll_fd`] gives while
    /// connecting.
    wake: UnixStream,
    /// The helper's own timeouts end it before this; a safety net only.
    deadline: Instant,
}

/// The ClawTerm handshake on a connected, non-blocking socket.
struct Handshake {
    conn: Conn,
    deadline: Instant,
    /// Nothing received yet (a plaintext client seeing a TLS record first says so).
    first: bool,
}

/// What a connection attempt needs, owned, so that it can run on a helper thread.
#[derive(Clone)]
struct Dialer {
    endpoint: String,
    connect_timeout: Duration,
    handshake_timeout: Duration,
    tls: Option<Arc<TlsSetup>>,
    trust: Option<super::transport::TlsTrust>,
    /// QUIC instead of TCP (with `tls`).
    quic: bool,
    /// The session a QUIC reconnect resumes (steers it to the owning shard).
    steer: Option<u32>,
}

impl Dialer {
    /// The error for an I/O failure on a connection (a TLS failure says what to do).
    fn io_error(&self, e: &std::io::Error) -> ClientError {
        match (as_rustls(e), &self.trust) {
            (Some(te), Some(trust)) => ClientError::Tls {
                endpoint: self.endpoint.clone(),
                reason: explain(te, trust),
            },
            _ => ClientError::Unreachable {
                endpoint: self.endpoint.clone(),
                reason: e.to_string(),
            },
        }
    }

    /// Resolves, connects and (with TLS) runs the TLS handshake, blocking: each step bounded
    /// by the connect or handshake timeout. Returns a blocking socket.
    fn dial(&self) -> Result<Conn, ClientError> {
        if self.quic {
            return self.dial_quic();
        }
        let sock = tcp_connect(&self.endpoint, self.connect_timeout)?;
        let _ = sock.set_nodelay(true);
        let Some(setup) = &self.tls else {
            return Ok(Conn::plain(sock));
        };
        sock.set_read_timeout(Some(self.handshake_timeout))
            .map_err(|e| self.io_error(&e))?;
        let _ = sock.set_write_timeout(Some(self.handshake_timeout));
        let deadline = Instant::now() + self.handshake_timeout;
        Conn::tls_handshake(sock, setup, deadline).map_err(|e| self.io_error(&e))
    }

    /// QUIC: resolve, then a QUIC handshake with each address in turn, bounded by the connect
    /// plus handshake timeouts.
    fn dial_quic(&self) -> Result<Conn, ClientError> {
        let Some(setup) = &self.tls else {
            return Err(ClientError::Io("QUIC needs TLS settings".into()));
        };
        let unreachable = |reason: String| ClientError::Unreachable {
            endpoint: self.endpoint.clone(),
            reason,
        };
        let addrs: Vec<SocketAddr> = self
            .endpoint
            .to_socket_addrs()
            .map_err(|e| unreachable(format!("cannot resolve: {e}")))?
            .collect();
        let mut last = String::from("no address");
        for a in addrs {
            match Conn::quic(
                a,
                setup,
                self.steer,
                self.connect_timeout + self.handshake_timeout,
            ) {
                Ok(c) => return Ok(c),
                Err(e) => match as_rustls(&e) {
                    Some(_) => return Err(self.io_error(&e)),
                    None => last = format!("QUIC: {e}"),
                },
            }
        }
        Err(unreachable(last))
    }

    /// Starts [`Dialer::dial`] on a helper thread.
    fn dial_in_background(&self) -> Result<Connecting, ClientError> {
        let io = |e: std::io::Error| ClientError::Io(format!("cannot start a reconnect: {e}"));
        let (wake, wake_tx) = UnixStream::pair().map_err(io)?;
        let (tx, rx) = mpsc::channel();
        let dialer = self.clone();
        std::thread::Builder::new()
            .name("clawterm-connect".into())
            .spawn(move || {
                let r = dialer.dial();
                // The session may have given up on us (detached, dropped): then the connection
                // is simply closed.
                let _ = tx.send(r);
                drop(wake_tx); // wakes the session's poll
            })
            .map_err(io)?;
        // The thread's own bounds: resolution (not bounded by us), connect per address,
        // TLS handshake. A resolver hanging longer than this counts as a failed attempt.
        let bound = self.connect_timeout * 4 + self.handshake_timeout + Duration::from_secs(5);
        Ok(Connecting {
            result: rx,
            wake,
            deadline: Instant::now() + bound,
        })
    }
}

/// A client session: one ClawTerm session over any number of TCP connections.
pub struct Session {
    core: ClientCore,
    endpoint: String,
    transport: Transport,
    tls: Option<Arc<TlsSetup>>,
    opts: Options,
    backoff: Backoff,
    /// When the last reconnect attempt started ([`Session::retry_now`] waits a second after).
    last_attempt: Option<Instant>,
    /// When the current connection came up (a clean close after a while of it is the server
    /// going away — restart, live upgrade — and is answered with an immediate reconnect).
    up_since: Option<Instant>,
    link: Link,
    wbuf: Vec<u8>,
    events: VecDeque<Event>,
    fatal: Option<ClientError>,
    epoch: Instant,
    last_seen: u64,
    /// The handshake in progress was answered with ROAM (the session is held by another node
    /// of a cluster): the endpoint changed; resume there.
    roamed: bool,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("endpoint", &self.endpoint)
            .field("transport", &self.transport)
            .field("core", &self.core)
            .finish_non_exhaustive()
    }
}

fn tcp_connect(endpoint: &str, timeout: Duration) -> Result<TcpStream, ClientError> {
    let unreachable = |reason: String| ClientError::Unreachable {
        endpoint: endpoint.to_string(),
        reason,
    };
    let addrs: Vec<SocketAddr> = endpoint
        .to_socket_addrs()
        .map_err(|e| unreachable(format!("cannot resolve: {e}")))?
        .collect();
    let mut last = String::from("no address");
    for a in addrs {
        match TcpStream::connect_timeout(&a, timeout) {
            Ok(s) => return Ok(s),
            Err(e) => last = e.to_string(),
        }
    }
    Err(unreachable(last))
}

impl Session {
    /// Opens a new session with the default [`Options`].
    pub fn connect(
        endpoint: &str,
        tenant: u32,
        agent: u32,
        token: [u8; 32],
    ) -> Result<Session, ClientError> {
        Session::connect_with(endpoint, tenant, agent, token, Options::default())
    }

    pub fn connect_with(
        endpoint: &str,
        tenant: u32,
        agent: u32,
        token: [u8; 32],
        opts: Options,
    ) -> Result<Session, ClientError> {
        let mut core = ClientCore::new(tenant, agent, token);
        core.set_timers(opts.timers);
        core.set_options(crate::core::CoreOptions {
            offer_roam: opts.follow_roam,
            ..core.options()
        });
        let mut s = Session::with_core(core, endpoint, opts)?;
        s.establish(false)?;
        Ok(s)
    }

    /// Resumes a saved session (taking it over from any other device) with the default
    /// [`Options`].
    pub fn resume(creds: &Credentials) -> Result<Session, ClientError> {
        Session::resume_with(creds, Options::default())
    }

    pub fn resume_with(creds: &Credentials, opts: Options) -> Result<Session, ClientError> {
        let mut core = ClientCore::for_resume(
            creds.tenant,
            creds.agent,
            creds.session_id,
            creds.resume_token,
            creds.last_seq,
            creds.next_seq,
        );
        core.set_timers(opts.timers);
        let mut s = Session::with_core(core, &creds.endpoint, opts)?;
        s.establish(true)?;
        Ok(s)
    }

    fn with_core(core: ClientCore, endpoint: &str, opts: Options) -> Result<Session, ClientError> {
        let target = Target::parse(endpoint).map_err(|e| ClientError::Unreachable {
            endpoint: endpoint.to_string(),
            reason: e,
        })?;
        let transport = if endpoint.contains("://") {
            target.transport
        } else {
            opts.transport.clone()
        };
        let tls = match transport.trust() {
            None => None,
            Some(trust) => Some(Arc::new(TlsSetup::new(trust, &target.addr)?)),
        };
        Ok(Session {
            core,
            endpoint: target.addr,
            transport,
            tls,
            backoff: opts.backoff.clone(),
            last_attempt: None,
            up_since: None,
            opts,
            link: Link::Closed,
            wbuf: Vec::new(),
            events: VecDeque::new(),
            fatal: None,
            epoch: Instant::now(),
            last_seen: unix_now(),
            roamed: false,
        })
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn dialer(&self) -> Dialer {
        Dialer {
            endpoint: self.endpoint.clone(),
            connect_timeout: self.opts.connect_timeout,
            handshake_timeout: self.opts.handshake_timeout,
            tls: self.tls.clone(),
            trust: self.transport.trust().cloned(),
            quic: matches!(self.transport, Transport::Quic(_)),
            steer: (self.core.session_id() != 0).then(|| self.core.session_id()),
        }
    }

    /// Opens a connection and runs the handshake (CONNECT or RESUME) to completion, blocking
    /// (the first connection of [`Session::connect`] and [`Session::resume`]).
    fn establish(&mut self, resume: bool) -> Result<usize, ClientError> {
        // A RESUME that reached a node not holding the session is answered with ROAM: follow it
        // (a few hops at most: a session that moved again meanwhile).
        let mut r = self.establish_once(resume);
        for _ in 0..4 {
            if r.is_ok() || !std::mem::take(&mut self.roamed) {
                break;
            }
            r = self.establish_once(true);
        }
        r
    }

    fn establish_once(&mut self, resume: bool) -> Result<usize, ClientError> {
        self.roamed = false;
        let r = (|| {
            let conn = self.dialer().dial()?;
            let mut hs = self.start_handshake(conn, resume)?;
            loop {
                if let Some(resent) = self.handshake_step(&mut hs)? {
                    return Ok((resent, hs.conn));
                }
                let events = libc::POLLIN
                    | if hs.conn.polls_for_write()
                        && (!self.wbuf.is_empty() || hs.conn.pending_output())
                    {
                        libc::POLLOUT
                    } else {
                        0
                    };
                let until = hs
                    .conn
                    .next_timeout()
                    .map_or(hs.deadline, |t| t.min(hs.deadline));
                let left = until.saturating_duration_since(Instant::now());
                let ms = left.as_millis().min(i32::MAX as u128) as i32;
                let _ = clawterm_poll::wait(&[(hs.conn.fd(), events)], &mut [0], ms.max(1));
            }
        })();
        match r {
            Ok((resent, conn)) => {
                self.attached(conn);
                Ok(resent)
            }
            Err(e) => {
                self.core.connection_lost();
                self.wbuf.clear();
                Err(e)
            }
        }
    }

    /// The handshake is done: the connection carries the session from now on.
    fn attached(&mut self, conn: Conn) {
        self.link = Link::Up(conn);
        self.up_since = Some(Instant::now());
        self.last_seen = unix_now();
        self.flush();
    }

    /// Sends CONNECT or RESUME on a fresh connection (made non-blocking).
    fn start_handshake(&mut self, mut conn: Conn, resume: bool) -> Result<Handshake, ClientError> {
        conn.set_nonblocking(true)
            .map_err(|e| self.dialer().io_error(&e))?;
        let now = self.now_ms();
        if resume {
            self.core.start_resume(now);
        } else {
            let mut nonce = [0u8; 16];
            let _ = getrandom::getrandom(&mut nonce);
            self.core.start_connect(nonce, now);
        }
        self.wbuf.clear();
        Ok(Handshake {
            conn,
            deadline: Instant::now() + self.opts.handshake_timeout,
            first: true,
        })
    }

    /// Advances the handshake without blocking: writes what is due, reads what has come.
    /// `Some(resent)` once attached (frames resent after RESUMED); `None`: not yet.
    fn handshake_step(&mut self, hs: &mut Handshake) -> Result<Option<usize>, ClientError> {
        let dialer = self.dialer();
        let endpoint = self.endpoint.clone();
        let unreachable = |reason: &str| ClientError::Unreachable {
            endpoint: endpoint.clone(),
            reason: reason.to_string(),
        };
        let plaintext = self.tls.is_none();
        // Write.
        self.wbuf.extend_from_slice(&self.core.take_output());
        match hs.conn.flush_tls() {
            Ok(()) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {}
            Err(e) => return Err(dialer.io_error(&e)),
        }
        let mut off = 0;
        while off < self.wbuf.len() {
            match hs.conn.write(&self.wbuf[off..]) {
                Ok(0) => return Err(unreachable("connection closed during the handshake")),
                Ok(n) => off += n,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => return Err(dialer.io_error(&e)),
            }
        }
        self.wbuf.drain(..off);
        // Read.
        let mut buf = vec![0u8; 64 * 1024];
        let mut resent = 0;
        while !self.core.is_attached() {
            let n = match hs.conn.read(&mut buf) {
                Ok(0) => {
                    return Err(unreachable(if plaintext {
                        "connection closed during the handshake (if the server uses TLS, \
                         connect without --plaintext)"
                    } else {
                        "connection closed during the handshake"
                    }))
                }
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => break,
                Err(e) => return Err(dialer.io_error(&e)),
            };
            let now = self.now_ms();
            let tls_record = plaintext && hs.first && matches!(buf[0], 0x15 | 0x16);
            hs.first = false;
            self.core.on_bytes(&buf[..n], now).map_err(|e| {
                if tls_record {
                    // A TLS alert or handshake record, not a ClawTerm frame.
                    ClientError::Tls {
                        endpoint: self.endpoint.clone(),
                        reason: "the server speaks TLS and refused plaintext: connect \
                                 without --plaintext (TLS is the default)"
                            .into(),
                    }
                } else {
                    ClientError::Protocol(e.to_string())
                }
            })?;
            while let Some(ev) = self.core.poll_event() {
                match ev {
                    CoreEvent::Error { code, message } => {
                        return Err(ClientError::from_code(
                            code,
                            message,
                            self.core.tenant(),
                            self.core.agent(),
                        ))
                    }
                    CoreEvent::Resumed { resent: r, .. } => resent = r,
                    CoreEvent::Roam(addr) => {
                        // Resume at the node that holds the session (PROTOCOL.md §2.6).
                        self.endpoint = addr.to_string();
                        self.roamed = true;
                        return Err(unreachable("the session is held by another node (ROAM)"));
                    }
                    other => self.push_core_event(other),
                }
            }
            if self.core.is_closed() {
                return Err(ClientError::Closed);
            }
        }
        if self.core.is_attached() {
            return Ok(Some(resent));
        }
        if Instant::now() >= hs.deadline {
            return Err(unreachable("no answer to the handshake"));
        }
        Ok(None)
    }

    fn push_core_event(&mut self, ev: CoreEvent) {
        match ev {
            CoreEvent::Data(d) => self.events.push_back(Event::Data(d)),
            CoreEvent::Gap => self.events.push_back(Event::Gap),
            CoreEvent::Ended => {
                self.events.push_back(Event::Ended);
                self.link = Link::Closed;
                self.fatal = Some(ClientError::Closed);
            }
            CoreEvent::Accepted { .. } | CoreEvent::Resumed { .. } => {}
            CoreEvent::Roam(addr) => {
                self.endpoint = addr.to_string();
                self.core.connection_lost();
                self.link = Link::Down {
                    retry_at: Instant::now(),
                    announced: false,
                };
                self.events.push_back(Event::Disconnected {
                    reason: format!("session moved to {addr}"),
                    retry_in: Duration::ZERO,
                    attempt: 0,
                });
            }
            CoreEvent::Error { code, message } => {
                let e =
                    ClientError::from_code(code, message, self.core.tenant(), self.core.agent());
                if e.is_fatal() {
                    self.link = Link::Closed;
                    self.fatal = Some(e);
                } else {
                    self.lost(e.to_string());
                }
            }
        }
    }

    /// The server closed a connection that had been up a while, without ERROR or DISCONNECT:
    /// it is going away (a restart, a live upgrade handing its sessions to a new process), and
    /// the session is resumable at once, so the first reconnect starts now rather than after a
    /// backoff wait. A connection closed within a second of coming up is an ordinary loss
    /// (backoff), so a server that keeps closing cannot make this a tight loop.
    fn closed_by_server(&mut self, reason: String) {
        let healthy = self
            .up_since
            .is_some_and(|t| t.elapsed() >= Duration::from_secs(1));
        self.lost(reason);
        if healthy && self.opts.auto_reconnect {
            if let Link::Down { retry_at, .. } = &mut self.link {
                *retry_at = Instant::now();
            }
            if let Some(Event::Disconnected { retry_in, .. }) = self.events.back_mut() {
                *retry_in = Duration::ZERO;
            }
        }
    }

    /// The connection is gone: schedule a reconnect.
    fn lost(&mut self, reason: String) {
        self.up_since = None;
        self.core.connection_lost();
        self.wbuf.clear();
        if matches!(self.link, Link::Closed) && self.fatal.is_some() {
            return;
        }
        if !self.opts.auto_reconnect {
            self.link = Link::Closed;
            self.fatal = Some(ClientError::Unreachable {
                endpoint: self.endpoint.clone(),
                reason,
            });
            return;
        }
        let attempt = self.backoff.attempt();
        let d = self.backoff.next_delay();
        self.link = Link::Down {
            retry_at: Instant::now() + d,
            announced: false,
        };
        self.events.push_back(Event::Disconnected {
            reason,
            retry_in: d,
            attempt,
        });
    }

    /// Reads what is available, runs timers, reconnects when due, flushes output. Never
    /// blocks (a reconnect's connect runs on a helper thread, its handshake non-blocking).
    fn drive(&mut self) {
        match &mut self.link {
            Link::Closed => {}
            Link::Down {
                retry_at,
                announced,
            } => {
                if Instant::now() < *retry_at {
                    return;
                }
                if !*announced {
                    *announced = true;
                    let attempt = self.backoff.attempt();
                    self.events.push_back(Event::Reconnecting { attempt });
                    return;
                }
                self.last_attempt = Some(Instant::now());
                match self.dialer().dial_in_background() {
                    Ok(c) => self.link = Link::Connecting(c),
                    Err(e) => self.attempt_failed(e),
                }
            }
            Link::Connecting(c) => {
                let got = match c.result.try_recv() {
                    Ok(r) => r,
                    Err(mpsc::TryRecvError::Empty) if Instant::now() < c.deadline => return,
                    Err(mpsc::TryRecvError::Empty) => Err(ClientError::Unreachable {
                        endpoint: self.endpoint.clone(),
                        reason: "connecting took too long (name resolution?)".into(),
                    }),
                    Err(mpsc::TryRecvError::Disconnected) => {
                        Err(ClientError::Io("the reconnect helper thread failed".into()))
                    }
                };
                match got.and_then(|conn| self.start_handshake(conn, true)) {
                    Ok(hs) => {
                        self.link = Link::Handshaking(hs);
                        self.drive();
                    }
                    Err(e) => self.attempt_failed(e),
                }
            }
            Link::Handshaking(_) => {
                let Link::Handshaking(mut hs) = std::mem::replace(&mut self.link, Link::Closed)
                else {
                    return;
                };
                // Before the replayed output that arrives with RESUMED.
                let mark = self.events.len();
                match self.handshake_step(&mut hs) {
                    Ok(None) => self.link = Link::Handshaking(hs),
                    Ok(Some(resent)) => {
                        self.backoff.reset();
                        self.events.insert(mark, Event::Reconnected { resent });
                        self.attached(hs.conn);
                    }
                    Err(e) => {
                        self.core.connection_lost();
                        self.wbuf.clear();
                        self.attempt_failed(e);
                    }
                }
            }
            Link::Up(stream) => {
                let mut buf = [0u8; 64 * 1024];
                let mut failure = None;
                let mut orderly = false;
                loop {
                    match stream.read(&mut buf) {
                        Ok(0) => {
                            failure = Some("the server closed the connection".to_string());
                            orderly = true;
                            break;
                        }
                        Ok(n) => {
                            let now = self.epoch.elapsed().as_millis() as u64;
                            if let Err(e) = self.core.on_bytes(&buf[..n], now) {
                                failure = Some(e.to_string());
                                break;
                            }
                            if !self.core.is_attached() {
                                break;
                            }
                        }
                        Err(e) if e.kind() == ErrorKind::Interrupted => {}
                        Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                        Err(e) => {
                            failure = Some(format!("connection lost: {e}"));
                            orderly = stream.closed_orderly();
                            break;
                        }
                    }
                }
                self.last_seen = unix_now();
                while let Some(ev) = self.core.poll_event() {
                    self.push_core_event(ev);
                }
                if !matches!(self.link, Link::Up(_)) {
                    return;
                }
                if let Some(f) = failure {
                    if orderly {
                        self.closed_by_server(f);
                    } else {
                        self.lost(f);
                    }
                    return;
                }
                let now = self.now_ms();
                if !self.core.tick(now) {
                    self.lost("no traffic from the server; the connection seems dead".into());
                    return;
                }
                self.flush();
            }
        }
    }

    /// A reconnect attempt failed: end for good if retrying cannot help, else schedule the
    /// next one.
    fn attempt_failed(&mut self, e: ClientError) {
        if e.is_fatal() {
            self.link = Link::Closed;
            self.fatal = Some(e);
        } else {
            self.lost(e.to_string());
        }
    }

    /// Moves the core's output to the socket (non-blocking; leftovers stay in the buffer).
    fn flush(&mut self) {
        let Link::Up(stream) = &mut self.link else {
            return;
        };
        self.wbuf.extend_from_slice(&self.core.take_output());
        let mut off = 0;
        let mut failure = None;
        // TLS records left over from an earlier write go first.
        match stream.flush_tls() {
            Ok(()) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => return,
            Err(e) => failure = Some(format!("connection lost: {e}")),
        }
        while failure.is_none() && off < self.wbuf.len() {
            match stream.write(&self.wbuf[off..]) {
                Ok(0) => {
                    failure = Some("connection closed while writing".to_string());
                    break;
                }
                Ok(n) => off += n,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => {
                    failure = Some(format!("connection lost: {e}"));
                    break;
                }
            }
        }
        let orderly = stream.closed_orderly();
        self.wbuf.drain(..off);
        if let Some(f) = failure {
            if orderly {
                self.closed_by_server(f);
                return;
            }
            self.lost(f);
        }
    }

    fn check_open(&self) -> Result<(), ClientError> {
        match &self.fatal {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        }
    }

    /// Sends input to the agent. While the connection is down it is queued and delivered after
    /// the reconnect; it is kept until the server acknowledges it.
    pub fn send(&mut self, data: &[u8]) -> Result<(), ClientError> {
        self.check_open()?;
        let now = self.now_ms();
        self.core.send_data(data, now);
        self.flush();
        Ok(())
    }

    /// While waiting to retry, tries again now instead (say, because the user typed: the
    /// network may well be back). Not sooner than a second after the last attempt started, so
    /// calling it often cannot turn the backoff into a tight loop; otherwise a no-op.
    pub fn retry_now(&mut self) {
        const MIN_GAP: Duration = Duration::from_secs(1);
        let now = Instant::now();
        if let Link::Down { retry_at, .. } = &mut self.link {
            let earliest = self.last_attempt.map_or(now, |t| t + MIN_GAP).max(now);
            if *retry_at > earliest {
                *retry_at = earliest;
            }
        }
    }

    /// Tells the agent the terminal size (remembered while down).
    pub fn resize(&mut self, cols: u16, rows: u16) -> Result<(), ClientError> {
        self.check_open()?;
        let now = self.now_ms();
        self.core.resize(cols, rows, now);
        self.flush();
        Ok(())
    }

    /// The next event without blocking (reconnect attempts included): `Ok(None)` when there
    /// is nothing yet. Fatal conditions (taken over, session expired, …) are errors.
    pub fn try_recv(&mut self) -> Result<Option<Event>, ClientError> {
        if let Some(e) = self.events.pop_front() {
            return Ok(Some(e));
        }
        self.check_open()?;
        self.drive();
        if let Some(e) = self.events.pop_front() {
            return Ok(Some(e));
        }
        self.check_open()?;
        Ok(None)
    }

    /// Waits up to `timeout` for the next event (`Ok(None)`: nothing happened).
    pub fn recv(&mut self, timeout: Duration) -> Result<Option<Event>, ClientError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(e) = self.try_recv()? {
                return Ok(Some(e));
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            let mut wait = deadline - now;
            if let Some(w) = self.next_deadline() {
                wait = wait.min(w.saturating_duration_since(now));
            }
            match self.poll_fd() {
                Some(fd) => {
                    let events = libc::POLLIN | if self.wants_write() { libc::POLLOUT } else { 0 };
                    let ms = wait.as_millis().min(i32::MAX as u128) as i32;
                    let _ = clawterm_poll::wait(&[(fd, events)], &mut [0], ms.max(1));
                }
                None => std::thread::sleep(wait.max(Duration::from_millis(1))),
            }
        }
    }

    /// The descriptor to wait on (readable ⇒ call [`Session::try_recv`]): the socket, or
    /// while a reconnect's connect runs in the background, a descriptor that becomes readable
    /// when it is done. `None` while waiting to retry (see [`Session::next_deadline`]) or
    /// closed.
    pub fn poll_fd(&self) -> Option<BorrowedFd<'_>> {
        match &self.link {
            Link::Up(s) => Some(s.fd()),
            Link::Handshaking(h) => Some(h.conn.fd()),
            Link::Connecting(c) => Some(c.wake.as_fd()),
            _ => None,
        }
    }

    /// Whether output is waiting for the socket to become writable.
    pub fn wants_write(&self) -> bool {
        match &self.link {
            Link::Up(c) => {
                c.polls_for_write()
                    && (!self.wbuf.is_empty() || self.core.has_output() || c.pending_output())
            }
            Link::Handshaking(h) => {
                h.conn.polls_for_write() && (!self.wbuf.is_empty() || h.conn.pending_output())
            }
            _ => false,
        }
    }

    /// When [`Session::try_recv`] must be called again even if the socket stays quiet (timers,
    /// reconnect). `None`: no timer (closed).
    pub fn next_deadline(&self) -> Option<Instant> {
        let quic_timer = |c: &Conn, t: Option<Instant>| match (c.next_timeout(), t) {
            (Some(q), Some(t)) => Some(q.min(t)),
            (q, t) => q.or(t),
        };
        match &self.link {
            Link::Up(c) => quic_timer(
                c,
                self.core
                    .next_timer()
                    .map(|ms| self.epoch + Duration::from_millis(ms)),
            ),
            Link::Down { retry_at, .. } => Some(*retry_at),
            Link::Connecting(c) => Some(c.deadline),
            Link::Handshaking(h) => quic_timer(&h.conn, Some(h.deadline)),
            Link::Closed => None,
        }
    }

    /// Whether a connection is up and attached.
    pub fn is_connected(&self) -> bool {
        matches!(self.link, Link::Up(_))
    }

    /// Cuts the current connection as if the network dropped it (testing, "reconnect now").
    pub fn drop_connection(&mut self, reason: &str) {
        match &mut self.link {
            Link::Up(c) | Link::Handshaking(Handshake { conn: c, .. }) => {
                c.abort();
                self.lost(reason.to_string());
            }
            Link::Connecting(_) => self.lost(reason.to_string()),
            Link::Down { .. } | Link::Closed => {}
        }
    }

    fn flush_blocking(&mut self) {
        if let Link::Up(stream) = &mut self.link {
            self.wbuf.extend_from_slice(&self.core.take_output());
            stream.finish(&self.wbuf, Duration::from_secs(2));
            self.wbuf.clear();
        }
    }

    /// Detaches on purpose: SUSPEND, then close. The session stays on the server; resume it
    /// with its [`Credentials`].
    pub fn detach(mut self) -> Credentials {
        let now = self.now_ms();
        self.core.suspend(now);
        self.flush_blocking();
        self.credentials("")
    }

    /// Ends the session on the server (DISCONNECT).
    pub fn end(mut self) {
        let now = self.now_ms();
        self.core.disconnect(now);
        self.flush_blocking();
    }

    /// The credentials to resume this session (from this or another device).
    pub fn credentials(&self, name: &str) -> Credentials {
        let mut transport = self.transport.clone();
        if let (Transport::Tls(t), Some(setup)) = (&mut transport, &self.tls) {
            // Keep the name the certificate is checked against if the address changed (ROAM).
            let name = setup.name.to_str();
            if t.server_name.is_none() && name != super::transport::host_of(&self.endpoint) {
                t.server_name = Some(name.into_owned());
            }
        }
        Credentials {
            name: name.to_string(),
            endpoint: Target {
                addr: self.endpoint.clone(),
                transport,
            }
            .to_string(),
            tenant: self.core.tenant(),
            agent: self.core.agent(),
            session_id: self.core.session_id(),
            resume_token: self.core.resume_token(),
            last_seq: self.core.last_seq(),
            next_seq: self.core.next_seq(),
            last_seen: self.last_seen,
        }
    }

    pub fn session_id(&self) -> u32 {
        self.core.session_id()
    }

    /// SEQ of the newest server DATA frame received (what a RESUME reports as `last_seq`).
    pub fn last_seq(&self) -> u32 {
        self.core.last_seq()
    }

    /// `HOST:PORT` of the server (without the transport).
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Plaintext or TLS, and the TLS trust in use.
    pub fn transport(&self) -> &Transport {
        &self.transport
    }

    /// The negotiated TLS version and cipher suite of the current connection (e.g.
    /// `("TLSv1_3", "TLS13_AES_256_GCM_SHA384")`); `None` over plaintext or while down.
    pub fn tls_info(&self) -> Option<(String, String)> {
        let Link::Up(c) = &self.link else { return None };
        c.tls_info()
    }

    /// Client DATA bytes not yet acknowledged by the server.
    pub fn unacked_bytes(&self) -> usize {
        self.core.unacked_bytes()
    }
}
