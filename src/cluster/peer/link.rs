//! The link threads: the listener, the connections it accepts, the ones [`super::Peers::send`]
//! opens, and the loop that drives one TLS link over a nonblocking socket.

use super::auth;
use super::wire::{self, PeerMsg, VERSION};
use super::{Ctl, Inner, Queue, CONNECT_TIMEOUT, HELLO_TIMEOUT, MAX_HANDSHAKING};
use std::cell::Cell;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// An idle link sends a Ping after this long without sending anything.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(5);
/// A link with nothing received for this long is dead.
const DEAD_AFTER: Duration = Duration::from_secs(20);
/// A retired link waits this long for the peer's close_notify.
const RETIRE_TIMEOUT: Duration = Duration::from_secs(5);
/// Closing waits this long for the last bytes to leave.
const CLOSE_FLUSH: Duration = Duration::from_secs(1);
/// One batch taken from the queue: up to this many bytes or messages.
const BATCH_BYTES: usize = 256 * 1024;
const BATCH_MSGS: usize = 4096;
/// At most this many TLS bytes are read before the messages are delivered.
const READ_BUDGET: usize = 1 << 20;
/// The longest sleep in poll (the stop flag and timers are checked at least this often).
const TICK_MS: i32 = 250;
/// A receive buffer left empty keeps at most this much capacity.
const KEEP_CAPACITY: usize = 1 << 20;

thread_local! {
    static ON_LINK: Cell<bool> = const { Cell::new(false) };
}

/// Whether the calling thread is a link thread (where `on_msg` runs).
pub(super) fn on_link_thread() -> bool {
    ON_LINK.with(Cell::get)
}

/// Why a link (or an attempt) ended.
#[derive(Debug)]
enum Fail {
    Io(io::Error),
    Tls(rustls::Error),
    Wire(wire::WireError),
    Protocol(String),
    Timeout(&'static str),
    Closed,
    Stopped,
}

impl std::fmt::Display for Fail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fail::Io(e) => write!(f, "{e}"),
            Fail::Tls(e) => write!(f, "TLS: {e}"),
            Fail::Wire(e) => write!(f, "bad frame: {e}"),
            Fail::Protocol(e) => write!(f, "{e}"),
            Fail::Timeout(what) => write!(f, "timed out: {what}"),
            Fail::Closed => write!(f, "closed before HELLO"),
            Fail::Stopped => write!(f, "shutting down"),
        }
    }
}

impl From<io::Error> for Fail {
    fn from(e: io::Error) -> Fail {
        Fail::Io(e)
    }
}

/// Counts a connection thread as live for as long as it runs.
struct Live(Arc<Inner>);

impl Drop for Live {
    fn drop(&mut self) {
        self.0.live.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Gives the queue up when the active link ends (a panic in `on_msg` included).
struct Deactivate<'a> {
    inner: &'a Inner,
    peer: &'a str,
    id: u64,
}

impl Drop for Deactivate<'_> {
    fn drop(&mut self) {
        self.inner.deactivate(self.peer, self.id);
    }
}

fn hello(inner: &Inner) -> PeerMsg {
    PeerMsg::Hello {
        version: VERSION,
        node: inner.node.clone(),
    }
}

/// Starts the thread of an outgoing connection to `peer` at `addr` (the slot is marked
/// connecting already). False if no thread could be started.
pub(super) fn spawn_outgoing(inner: Arc<Inner>, peer: String, addr: SocketAddr) -> bool {
    inner.live.fetch_add(1, Ordering::SeqCst);
    let i2 = inner.clone();
    let spawned = std::thread::Builder::new()
        .name("peer-link".into())
        .spawn(move || {
            let live = Live(i2);
            ON_LINK.with(|c| c.set(true));
            outgoing(&live.0, &peer, addr);
        });
    match spawned {
        Ok(_) => true,
        Err(e) => {
            inner.live.fetch_sub(1, Ordering::SeqCst);
            tracing::warn!("peer link: cannot start a thread for {addr}: {e}");
            false
        }
    }
}

fn outgoing(inner: &Arc<Inner>, peer: &str, addr: SocketAddr) {
    let attempt = Ctl::new()
        .map_err(Fail::Io)
        .and_then(|ctl| Ok((ctl, connect(inner, peer, addr)?)));
    let (ctl, conn) = match attempt {
        Ok((ctl, conn)) => (Arc::new(ctl), conn),
        Err(e) => {
            let up = inner.outgoing_done(peer, false);
            if up || matches!(e, Fail::Stopped) {
                // Lost the race to a link that is up (the other node kept its own), or closing.
                tracing::debug!("peer link to {peer} at {addr}: {e}");
            } else {
                tracing::warn!("peer link to {peer} at {addr}: {e}; messages for it dropped");
            }
            return;
        }
    };
    let id = inner.next_id.fetch_add(1, Ordering::SeqCst);
    let queue = inner.register(peer, id, &inner.node, &ctl);
    inner.outgoing_done(peer, true);
    if queue.is_some() {
        tracing::info!("peer link to {peer} at {addr} is up");
    }
    drive(inner, conn, peer, id, queue, &ctl);
}

fn connect(inner: &Inner, peer: &str, addr: SocketAddr) -> Result<Conn, Fail> {
    let sock = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)?;
    let deadline = Instant::now() + HELLO_TIMEOUT;
    let tls = rustls::ClientConnection::new(inner.auth.client_config(), auth::server_name())
        .map_err(Fail::Tls)?;
    let mut conn = Conn::new(sock, tls.into(), addr)?;
    conn.send(&hello(inner))?;
    let node = conn.hello(inner, deadline)?;
    if node != peer {
        return Err(Fail::Protocol(format!(
            "the node there says it is {node:?}, not {peer:?}"
        )));
    }
    Ok(conn)
}

/// The listener thread: accepts connections and starts a thread for each.
pub(super) fn listen(inner: Arc<Inner>, listener: TcpListener, wake: Arc<Ctl>) {
    loop {
        if inner.stopping() {
            return;
        }
        let mut rev = [0i16; 2];
        let fds = [
            (listener.as_fd(), libc::POLLIN),
            (wake.as_fd(), libc::POLLIN),
        ];
        if let Err(e) = clawterm_poll::wait(&fds, &mut rev, -1) {
            tracing::warn!("peer link: poll on the listener failed: {e}");
            std::thread::sleep(Duration::from_millis(100));
            continue;
        }
        if rev[1] != 0 {
            wake.clear();
        }
        if inner.stopping() {
            return;
        }
        loop {
            match listener.accept() {
                Ok((sock, addr)) => {
                    if inner.handshaking.load(Ordering::SeqCst) >= MAX_HANDSHAKING {
                        tracing::warn!(
                            "peer link: {MAX_HANDSHAKING} connections already in their \
                             handshake; closing the one from {addr}"
                        );
                        continue;
                    }
                    spawn_incoming(&inner, sock, addr);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // Out of descriptors and the like: let it pass rather than spin.
                    tracing::warn!("peer link: accept failed: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                    break;
                }
            }
        }
    }
}

fn spawn_incoming(inner: &Arc<Inner>, sock: TcpStream, addr: SocketAddr) {
    let accepted = Instant::now();
    inner.handshaking.fetch_add(1, Ordering::SeqCst);
    inner.live.fetch_add(1, Ordering::SeqCst);
    let i2 = inner.clone();
    let spawned = std::thread::Builder::new()
        .name("peer-link".into())
        .spawn(move || {
            let live = Live(i2);
            ON_LINK.with(|c| c.set(true));
            incoming(&live.0, sock, addr, accepted);
        });
    if let Err(e) = spawned {
        inner.handshaking.fetch_sub(1, Ordering::SeqCst);
        inner.live.fetch_sub(1, Ordering::SeqCst);
        tracing::warn!("peer link: cannot start a thread for {addr}: {e}");
    }
}

fn incoming(inner: &Arc<Inner>, sock: TcpStream, addr: SocketAddr, accepted: Instant) {
    let res = accept(inner, sock, addr, accepted + HELLO_TIMEOUT);
    inner.handshaking.fetch_sub(1, Ordering::SeqCst);
    let (mut conn, peer, ctl) = match res {
        Ok(x) => x,
        Err(Fail::Stopped) => return,
        Err(e) => {
            tracing::warn!("peer link: connection from {addr} refused: {e}");
            return;
        }
    };
    let id = inner.next_id.fetch_add(1, Ordering::SeqCst);
    let Some(queue) = inner.register(&peer, id, &peer, &ctl) else {
        // Our own link to it wins (or we are closing): no HELLO, so it sends nothing more.
        tracing::debug!("peer link from {peer} at {addr}: a link opened by this node is kept");
        conn.close();
        return;
    };
    tracing::info!("peer link from {peer} at {addr} is up");
    if let Err(e) = conn.send(&hello(inner)) {
        inner.deactivate(&peer, id);
        tracing::warn!("peer link from {peer} at {addr}: {e}");
        return;
    }
    drive(inner, conn, &peer, id, Some(queue), &ctl);
}

fn accept(
    inner: &Inner,
    sock: TcpStream,
    addr: SocketAddr,
    deadline: Instant,
) -> Result<(Conn, String, Arc<Ctl>), Fail> {
    let ctl = Arc::new(Ctl::new()?);
    let tls = rustls::ServerConnection::new(inner.auth.server_config()).map_err(Fail::Tls)?;
    let mut conn = Conn::new(sock, tls.into(), addr)?;
    let node = conn.hello(inner, deadline)?;
    Ok((conn, node, ctl))
}

/// Runs an established link until it ends. `queue`: the node's queue if this link is the
/// active one; `None` if it was refused at registration (it only drains what the peer sent).
fn drive(inner: &Inner, mut conn: Conn, peer: &str, id: u64, queue: Option<Arc<Queue>>, ctl: &Ctl) {
    let _active = queue.is_some().then_some(Deactivate { inner, peer, id });
    let addr = conn.addr;
    match run(inner, &mut conn, peer, queue.as_deref(), ctl) {
        Ok(why) => tracing::debug!("peer link {id} with {peer} at {addr}: {why}"),
        Err(e) => tracing::warn!("peer link with {peer} at {addr} closed: {e}"),
    }
}

fn run(
    inner: &Inner,
    conn: &mut Conn,
    peer: &str,
    queue: Option<&Queue>,
    ctl: &Ctl,
) -> Result<&'static str, Fail> {
    let nonce: u64 = rand::random();
    // Set once this link is retired: then it sends nothing more and waits for the peer's end.
    let mut retire_by = None;
    if queue.is_none() {
        conn.tls.send_close_notify();
        retire_by = Some(Instant::now() + RETIRE_TIMEOUT);
    }
    // What came in right behind the peer's HELLO.
    deliver(inner, conn, peer, nonce, retire_by.is_none())?;
    loop {
        let now = Instant::now();
        if inner.stopping() {
            if retire_by.is_none() {
                conn.tls.send_close_notify();
            }
            conn.finish();
            return Ok("shut down");
        }
        if retire_by.is_none() && ctl.retire.load(Ordering::SeqCst) {
            conn.tls.send_close_notify();
            retire_by = Some(now + RETIRE_TIMEOUT);
        }
        let queue = queue.filter(|_| retire_by.is_none());
        // The next batch once the previous one is in the kernel.
        if let Some(q) = queue {
            if !conn.tls.wants_write() {
                conn.out.clear();
                let mut n = 0;
                while conn.out.len() < BATCH_BYTES && n < BATCH_MSGS {
                    let Some(m) = q.pop() else { break };
                    n += 1;
                    if let Err(e) = wire::encode(&m, &mut conn.out) {
                        tracing::warn!("peer link to {peer}: message dropped: {e}");
                    }
                }
                if !conn.out.is_empty() {
                    conn.write_out()?;
                    conn.last_tx = now;
                }
            }
            let probe = ctl.probe.swap(false, Ordering::SeqCst);
            if probe || now.duration_since(conn.last_tx) >= KEEPALIVE_IDLE {
                conn.send(&PeerMsg::Ping { nonce })?;
                conn.last_tx = now;
            }
        }
        if now.duration_since(conn.last_rx) >= DEAD_AFTER {
            return Err(Fail::Timeout("nothing from the peer for 20 s"));
        }
        if retire_by.is_some_and(|t| now >= t) {
            conn.finish();
            return Ok("retired (the peer did not close in time)");
        }
        conn.flush()?;

        // Sleep until the socket or the queue has something (or a tick passes).
        let pull = queue.filter(|_| !conn.tls.wants_write());
        let mut ms = TICK_MS;
        if let Some(q) = pull {
            ctl.armed.store(true, Ordering::SeqCst);
            if !q.is_empty() {
                ms = 0;
            }
        }
        let (sock_ready, ctl_ready) = conn.wait(ms, Some(ctl));
        ctl.armed.store(false, Ordering::SeqCst);
        if ctl_ready {
            ctl.clear();
        }
        let read = if sock_ready { conn.fill() } else { Ok(()) };
        // Deliver what arrived, even if the link broke right after it.
        deliver(inner, conn, peer, nonce, retire_by.is_none())?;
        read?;
        if conn.eof {
            // Our own end, after whatever is still unsent.
            if retire_by.is_none() {
                conn.tls.send_close_notify();
            }
            conn.finish();
            let retired = retire_by.is_some() || ctl.retire.load(Ordering::SeqCst);
            return Ok(if retired {
                "retired"
            } else {
                "closed by the peer"
            });
        }
    }
}

/// Hands every whole message received to `on_msg`, answering pings (`open`: this side has not
/// sent close_notify yet).
fn deliver(inner: &Inner, conn: &mut Conn, peer: &str, nonce: u64, open: bool) -> Result<(), Fail> {
    while let Some(m) = conn.next_msg()? {
        match m {
            PeerMsg::Hello { .. } => return Err(Fail::Protocol("a second HELLO".into())),
            PeerMsg::Ping { nonce } => {
                if open {
                    conn.send(&PeerMsg::Pong { nonce })?;
                }
            }
            PeerMsg::Pong { nonce: n } if n == nonce => {}
            m => (inner.on_msg)(peer, m),
        }
    }
    Ok(())
}

/// One TCP socket with TLS, nonblocking, and the plaintext both ways.
struct Conn {
    sock: TcpStream,
    tls: rustls::Connection,
    addr: SocketAddr,
    /// Received plaintext; frames start at `at`.
    inbuf: Vec<u8>,
    at: usize,
    /// Encoding scratch.
    out: Vec<u8>,
    /// The peer closed (close_notify or EOF).
    eof: bool,
    last_rx: Instant,
    last_tx: Instant,
}

impl Conn {
    fn new(sock: TcpStream, mut tls: rustls::Connection, addr: SocketAddr) -> io::Result<Conn> {
        sock.set_nodelay(true)?;
        sock.set_nonblocking(true)?;
        // The batches are bounded by the link loop (one in flight at a time).
        tls.set_buffer_limit(None);
        let now = Instant::now();
        Ok(Conn {
            sock,
            tls,
            addr,
            inbuf: Vec::new(),
            at: 0,
            out: Vec::new(),
            eof: false,
            last_rx: now,
            last_tx: now,
        })
    }

    /// Drives the TLS handshake until the peer's HELLO; returns its node id.
    fn hello(&mut self, inner: &Inner, deadline: Instant) -> Result<String, Fail> {
        loop {
            if inner.stopping() {
                return Err(Fail::Stopped);
            }
            self.flush()?;
            let read = self.fill();
            if let Some(m) = self.next_msg()? {
                return match m {
                    PeerMsg::Hello { version, .. } if version != VERSION => Err(Fail::Protocol(
                        format!("HELLO version {version} (this node speaks {VERSION})"),
                    )),
                    PeerMsg::Hello { node, .. } if node == inner.node => Err(Fail::Protocol(
                        format!("HELLO with this node's own id {node:?}"),
                    )),
                    PeerMsg::Hello { node, .. } if node.is_empty() => {
                        Err(Fail::Protocol("HELLO with an empty node id".into()))
                    }
                    PeerMsg::Hello { node, .. } => Ok(node),
                    m => Err(Fail::Protocol(format!(
                        "first message is type {:#04x}, not HELLO",
                        m.type_code()
                    ))),
                };
            }
            read?;
            if self.eof {
                return Err(Fail::Closed);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Fail::Timeout("TLS handshake and HELLO take over 5 s"));
            }
            let ms = i32::try_from(left.as_millis()).map_or(TICK_MS, |ms| ms.clamp(1, TICK_MS));
            self.wait(ms, None);
        }
    }

    /// Polls the socket (and `ctl`) for up to `ms`; whether each is ready. A failed poll
    /// counts as ready, so that the next read or write reports the error.
    fn wait(&self, ms: i32, ctl: Option<&Ctl>) -> (bool, bool) {
        let mut ev = libc::POLLIN;
        if self.tls.wants_write() {
            ev |= libc::POLLOUT;
        }
        let mut rev = [0i16; 2];
        let res = match ctl {
            Some(c) => clawterm_poll::wait(
                &[(self.sock.as_fd(), ev), (c.as_fd(), libc::POLLIN)],
                &mut rev,
                ms,
            ),
            None => clawterm_poll::wait(&[(self.sock.as_fd(), ev)], &mut rev, ms),
        };
        match res {
            Ok(_) => (rev[0] != 0, rev[1] != 0),
            Err(_) => (true, false),
        }
    }

    /// Reads what the socket has (up to [`READ_BUDGET`]) through TLS into `inbuf`.
    fn fill(&mut self) -> Result<(), Fail> {
        let mut got = 0;
        while got < READ_BUDGET && !self.eof {
            match self.tls.read_tls(&mut self.sock) {
                Ok(0) => {
                    self.eof = true;
                    break;
                }
                Ok(n) => {
                    got += n;
                    self.last_rx = Instant::now();
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Fail::Io(e)),
            }
            let state = match self.tls.process_new_packets() {
                Ok(s) => s,
                Err(e) => {
                    // Send the alert, best effort.
                    let _ = self.flush();
                    return Err(Fail::Tls(e));
                }
            };
            let n = state.plaintext_bytes_to_read();
            if n > 0 {
                let old = self.inbuf.len();
                self.inbuf.resize(old + n, 0);
                self.tls.reader().read_exact(&mut self.inbuf[old..])?;
            }
            if state.peer_has_closed() {
                self.eof = true;
            }
        }
        Ok(())
    }

    /// The next whole message received, if any.
    fn next_msg(&mut self) -> Result<Option<PeerMsg>, Fail> {
        let rest = self.inbuf.get(self.at..).unwrap_or_default();
        match wire::decode(rest) {
            Ok(Some((m, n))) => {
                self.at += n;
                if self.at >= self.inbuf.len() {
                    self.at = 0;
                    if self.inbuf.capacity() > KEEP_CAPACITY {
                        self.inbuf = Vec::new();
                    } else {
                        self.inbuf.clear();
                    }
                }
                Ok(Some(m))
            }
            Ok(None) => {
                if self.at > 0 {
                    self.inbuf.drain(..self.at);
                    self.at = 0;
                }
                Ok(None)
            }
            Err(e) => Err(Fail::Wire(e)),
        }
    }

    /// Encodes one message into TLS.
    fn send(&mut self, m: &PeerMsg) -> Result<(), Fail> {
        self.out.clear();
        wire::encode(m, &mut self.out).map_err(Fail::Wire)?;
        self.write_out()
    }

    /// Hands `out` to TLS (unbounded buffer: never short).
    fn write_out(&mut self) -> Result<(), Fail> {
        self.tls.writer().write_all(&self.out)?;
        self.out.clear();
        if self.out.capacity() > KEEP_CAPACITY {
            self.out = Vec::new();
        }
        Ok(())
    }

    /// Writes TLS bytes until done or the socket is full.
    fn flush(&mut self) -> Result<(), Fail> {
        while self.tls.wants_write() {
            match self.tls.write_tls(&mut self.sock) {
                Ok(0) => return Err(Fail::Io(io::ErrorKind::WriteZero.into())),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Fail::Io(e)),
            }
        }
        Ok(())
    }

    /// Lets the last bytes leave (up to [`CLOSE_FLUSH`]).
    fn finish(&mut self) {
        let until = Instant::now() + CLOSE_FLUSH;
        while self.tls.wants_write() && Instant::now() < until {
            if self.flush().is_err() {
                return;
            }
            if self.tls.wants_write() {
                let mut rev = [0i16];
                let _ = clawterm_poll::wait(&[(self.sock.as_fd(), libc::POLLOUT)], &mut rev, 50);
            }
        }
    }

    /// Sends close_notify and closes.
    fn close(mut self) {
        self.tls.send_close_notify();
        self.finish();
    }
}
