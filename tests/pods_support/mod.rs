//! Harness for the pod-side black-box tests (`tests/pods_e2e.rs`): real `clawtermd` and
//! `claw-agent` processes, a protocol client built on `clawterm::proto`, and a fake pod (a
//! `UnixListener` speaking the pod link with `clawterm::podlink`) that records everything the
//! daemon sends it.
//!
//! Every wait is bounded.

#![allow(dead_code)]

use clawterm::podlink::{self, Msg};
use clawterm::proto::{self, Decoded, FrameType};
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

// Not every test binary uses every re-export.
use crate::harness::{
    agent_command, clawtermd, connect_tcp, set_client_opts, signal, start_server, stop, tcp_addr,
    Lines,
};
#[allow(unused_imports)]
pub use crate::harness::{hwm_kib, rss_kib, wait_timeout, wait_until, TempDir};

pub const TENANT: u32 = 7;
pub const AGENT: u32 = 1;
pub const TOKEN: [u8; 32] = [0x11; 32];

/// ERROR codes (PROTOCOL.md §6).
pub const E_NO_AGENT: u16 = 5;
pub const E_AGENT_GONE: u16 = 10;

/// Default bound for a single wait.
pub const TIMEOUT: Duration = Duration::from_secs(5);

pub fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

// ---------------------------------------------------------------------------------------------
// Processes

/// A `claw-agent` process.
pub struct AgentProc {
    child: Child,
    pub socket: PathBuf,
}

impl AgentProc {
    /// `claw-agent -s DIR --tenant T --agent A echo`.
    pub fn echo(dir: &Path, tenant: u32, agent: u32) -> AgentProc {
        AgentProc::start(dir, tenant, agent, &["echo"])
    }

    /// `claw-agent -s DIR --tenant T --agent A exec -- sh -c SCRIPT`.
    pub fn exec_sh(dir: &Path, tenant: u32, agent: u32, script: &str) -> AgentProc {
        AgentProc::start(dir, tenant, agent, &["exec", "--", "sh", "-c", script])
    }

    /// Starts the agent and waits (up to 10 s) for its socket to be listening.
    pub fn start(dir: &Path, tenant: u32, agent: u32, args: &[&str]) -> AgentProc {
        let mut a = AgentProc::spawn(dir, tenant, agent, args);
        a.wait_listening();
        a
    }

    /// Starts the agent without waiting for its socket.
    pub fn spawn(dir: &Path, tenant: u32, agent: u32, args: &[&str]) -> AgentProc {
        let socket = dir.join(format!("{tenant}_{agent}"));
        let child = agent_command(dir, tenant, agent, args)
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn claw-agent");
        AgentProc { child, socket }
    }

    /// Waits (up to 10 s) until the socket accepts connections (a stale socket file may be
    /// there before the agent replaces it).
    pub fn wait_listening(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while UnixStream::connect(&self.socket).is_err() {
            if let Ok(Some(s)) = self.child.try_wait() {
                panic!("claw-agent exited early: {s}");
            }
            assert!(
                Instant::now() < deadline,
                "claw-agent socket {} never became connectable",
                self.socket.display()
            );
            std::thread::sleep(ms(2));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL: the socket file stays behind (stale).
    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait for the exit (the agent removes its socket).
    pub fn terminate(mut self) -> Option<ExitStatus> {
        signal(self.child.id(), libc::SIGTERM);
        wait_timeout(&mut self.child, Duration::from_secs(5))
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        stop(&mut self.child);
    }
}

/// A running `clawtermd`.
pub struct Server {
    child: Child,
    pub addr: SocketAddr,
    /// The WebSocket port (on unless `--no-ws`).
    pub ws: Option<SocketAddr>,
    lines: Lines,
}

impl Server {
    /// `clawtermd --bind 127.0.0.1 --port 0 --insecure-plaintext --insecure-no-auth
    /// --socket-dir DIR --shards N --io IO --admin off --no-quic EXTRA...`.
    pub fn start(io: &str, shards: usize, sock_dir: &Path, extra: &[&str]) -> Server {
        let mut cmd = clawtermd();
        cmd.args(["--bind", "127.0.0.1", "--port", "0"])
            .args(["--insecure-plaintext", "--insecure-no-auth"])
            .arg("--socket-dir")
            .arg(sock_dir)
            .args(["--shards", &shards.to_string(), "--io", io])
            .args(["--admin", "off", "--no-quic"])
            .args(extra);
        // PODS_E2E_LOG=debug gives a detailed server log in failure messages.
        let level = std::env::var("PODS_E2E_LOG").unwrap_or_else(|_| "info".into());
        cmd.env("RUST_LOG", level);
        let (child, lines, line) = start_server(&mut cmd, "clawtermd");
        let addr = tcp_addr(&line).expect("listen address");
        let ws = clawterm_testkit::ws_addr(&line);
        Server {
            child,
            addr,
            ws,
            lines,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// The last `n` stderr lines, for failure messages.
    pub fn log_tail(&self, n: usize) -> String {
        let l = self.lines.lock().unwrap();
        l[l.len().saturating_sub(n)..].join("\n")
    }

    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn client(&self) -> Client {
        Client::connect(self.addr)
    }

    /// A new attached session to (TENANT, agent).
    pub fn session(&self, agent: u32) -> Client {
        let mut c = self.client();
        if let Err(e) = c.try_connect(TENANT, agent) {
            panic!(
                "CONNECT to agent {agent} refused with ERROR {e}; server log:\n{}",
                self.log_tail(20)
            );
        }
        c
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        stop(&mut self.child);
        if std::thread::panicking() {
            eprintln!(
                "--- clawtermd log (last 60 lines) ---\n{}",
                self.log_tail(60)
            );
        }
    }
}

/// Samples a process's VmRSS every 10 ms on a thread until dropped/finished.
pub struct RssSampler {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicUsize>,
    samples: Arc<AtomicUsize>,
    handle: Option<JoinHandle<()>>,
}

impl RssSampler {
    pub fn start(pid: u32) -> RssSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicUsize::new(0));
        let samples = Arc::new(AtomicUsize::new(0));
        let handle = {
            let (stop, peak, samples) = (stop.clone(), peak.clone(), samples.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if let Some(k) = rss_kib(pid) {
                        peak.fetch_max(k as usize, Ordering::Relaxed);
                        samples.fetch_add(1, Ordering::Relaxed);
                    }
                    std::thread::sleep(ms(10));
                }
            })
        };
        RssSampler {
            stop,
            peak,
            samples,
            handle: Some(handle),
        }
    }

    /// Stops sampling: (peak KiB, number of samples).
    pub fn finish(mut self) -> (u64, usize) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
        (
            self.peak.load(Ordering::Relaxed) as u64,
            self.samples.load(Ordering::Relaxed),
        )
    }
}

impl Drop for RssSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

// ---------------------------------------------------------------------------------------------
// Client

/// An owned frame from the server.
#[derive(Clone, PartialEq, Eq)]
pub struct Frame {
    pub sid: u32,
    pub seq: u32,
    pub ty: FrameType,
    pub flags: u8,
    pub payload: Vec<u8>,
}

impl std::fmt::Debug for Frame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let p = String::from_utf8_lossy(&self.payload[..self.payload.len().min(40)]).into_owned();
        write!(
            f,
            "{}{{sid={:#x} seq={} flags={:#x} len={} {:?}}}",
            self.ty.name(),
            self.sid,
            self.seq,
            self.flags,
            self.payload.len(),
            p
        )
    }
}

impl Frame {
    pub fn u32_at(&self, off: usize) -> u32 {
        u32::from_be_bytes(self.payload[off..off + 4].try_into().unwrap())
    }

    pub fn error_code(&self) -> Option<u16> {
        (self.ty == FrameType::Error && self.payload.len() >= 2)
            .then(|| u16::from_be_bytes([self.payload[0], self.payload[1]]))
    }
}

#[derive(Debug)]
pub enum Event {
    Frame(Frame),
    Closed,
    Timeout,
}

/// RESUMED, decoded.
#[derive(Debug, Clone, Copy)]
pub struct Resumed {
    pub seq: u32,
    pub flags: u8,
    pub last_client_seq: u32,
    pub first_replay_seq: u32,
}

pub struct Client {
    stream: TcpStream,
    buf: Vec<u8>,
    start: usize,
    eof: bool,
    pub sid: u32,
    pub tx_seq: u32,
    pub token: [u8; 16],
    /// Highest server SEQ seen on this connection.
    pub last_seq: u32,
}

impl Client {
    pub fn connect(addr: SocketAddr) -> Client {
        Client::from_stream(connect_tcp(addr, TIMEOUT))
    }

    pub fn from_stream(stream: TcpStream) -> Client {
        set_client_opts(&stream, TIMEOUT);
        Client {
            stream,
            buf: Vec::with_capacity(1 << 18),
            start: 0,
            eof: false,
            sid: 0,
            tx_seq: 0,
            token: [0; 16],
            last_seq: 0,
        }
    }

    /// A second handle on the connection (e.g. for a writer thread; the two must not both
    /// write).
    pub fn try_clone_stream(&self) -> TcpStream {
        self.stream.try_clone().expect("clone the client's socket")
    }

    /// Sets SO_SNDBUF (the kernel then stops auto-tuning it), so a writer blocks soon after
    /// the server stops reading.
    pub fn set_send_buffer(&self, bytes: usize) {
        use std::os::fd::AsRawFd;
        let v = bytes as libc::c_int;
        // SAFETY: setsockopt on our own socket with a valid pointer to a c_int and its size.
        let r = unsafe {
            libc::setsockopt(
                self.stream.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_SNDBUF,
                (&v as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(r, 0, "SO_SNDBUF: {}", std::io::Error::last_os_error());
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.stream.local_addr().unwrap()
    }

    pub fn send_frame(&mut self, sid: u32, ty: FrameType, payload: &[u8]) -> u32 {
        self.tx_seq = self.tx_seq.wrapping_add(1);
        let mut out = Vec::with_capacity(proto::OVERHEAD + payload.len());
        proto::encode_to_vec(&mut out, sid, self.tx_seq, ty, 0, payload);
        self.stream
            .write_all(&out)
            .unwrap_or_else(|e| panic!("write {}: {e}", ty.name()));
        self.tx_seq
    }

    /// Sends a frame for this connection's session; returns its SEQ.
    pub fn send(&mut self, ty: FrameType, payload: &[u8]) -> u32 {
        self.send_frame(self.sid, ty, payload)
    }

    pub fn send_data(&mut self, payload: &[u8]) -> u32 {
        self.send(FrameType::Data, payload)
    }

    /// Cumulative ACK (4-byte form). Tolerates a connection the server already closed (it
    /// may have sent DISCONNECT after the frame being acknowledged).
    pub fn ack(&mut self, seq: u32) -> bool {
        self.tx_seq = self.tx_seq.wrapping_add(1);
        let mut out = Vec::with_capacity(proto::OVERHEAD + 4);
        proto::encode_to_vec(
            &mut out,
            self.sid,
            self.tx_seq,
            FrameType::Ack,
            0,
            &seq.to_be_bytes(),
        );
        self.stream.write_all(&out).is_ok()
    }

    /// SUSPEND, then wait (bounded) for the server to close the connection.
    pub fn suspend(mut self) {
        self.send(FrameType::Suspend, &[]);
        let deadline = Instant::now() + TIMEOUT;
        loop {
            match self.recv_event(deadline.saturating_duration_since(Instant::now())) {
                Event::Closed => return,
                Event::Frame(_) => continue, // output sent before the SUSPEND was seen
                Event::Timeout => panic!("the server did not close the connection after SUSPEND"),
            }
        }
    }

    pub fn send_connect(&mut self, tenant: u32, agent: u32) {
        let c = proto::Connect {
            version: 1,
            caps: proto::CAP_V1,
            caps_width: proto::payload::CapsWidth::U8,
            tenant_id: tenant,
            agent_id: agent,
            token: TOKEN,
            nonce: [0x42; 16],
        };
        let mut p = Vec::with_capacity(58);
        c.encode(&mut p);
        assert_eq!(p.len(), 58);
        self.send_frame(0, FrameType::Connect, &p);
    }

    /// CONNECT: `Ok(sid)` on ACCEPT, `Err(code)` on ERROR (the connection is then closed).
    pub fn try_connect(&mut self, tenant: u32, agent: u32) -> Result<u32, u16> {
        self.send_connect(tenant, agent);
        self.connect_answer()
    }

    /// Waits for the answer to a CONNECT already sent.
    pub fn connect_answer(&mut self) -> Result<u32, u16> {
        let f = self.recv();
        match f.ty {
            FrameType::Accept => {
                let a = proto::Accept::parse(&f.payload).expect("ACCEPT payload");
                assert_eq!(a.session_id, f.sid, "ACCEPT header/payload sid differ");
                assert_ne!(a.session_id, 0);
                self.sid = a.session_id;
                self.token = a.resume_token.expect("ACCEPT carries a resume token");
                Ok(self.sid)
            }
            FrameType::Error => Err(f.error_code().unwrap()),
            _ => panic!("expected ACCEPT or ERROR, got {f:?}"),
        }
    }

    /// RESUME (24 bytes), expecting RESUMED.
    pub fn resume(&mut self, sid: u32, last_seq: u32, token: &[u8; 16]) -> Resumed {
        let mut p = Vec::with_capacity(24);
        proto::Resume::Full {
            session_id: sid,
            last_seq,
            token: *token,
        }
        .encode(&mut p);
        self.send_frame(sid, FrameType::Resume, &p);
        let f = self.recv();
        assert_eq!(f.ty, FrameType::Resumed, "expected RESUMED, got {f:?}");
        let r = proto::Resumed::parse(&f.payload).expect("RESUMED payload");
        assert_eq!(r.session_id, sid);
        self.sid = sid;
        self.token = *token;
        Resumed {
            seq: f.seq,
            flags: f.flags,
            last_client_seq: r.last_client_seq,
            first_replay_seq: r.first_replay_seq,
        }
    }

    /// The next frame, or EOF, or nothing within `t`.
    pub fn recv_event(&mut self, t: Duration) -> Event {
        let deadline = Instant::now() + t;
        loop {
            match proto::decode(&self.buf[self.start..], proto::MAX_PAYLOAD) {
                Ok(Decoded::Frame(f, used)) => {
                    let fr = Frame {
                        sid: f.session_id,
                        seq: f.seq,
                        ty: f.ty,
                        flags: f.flags,
                        payload: f.payload.to_vec(),
                    };
                    self.start += used;
                    if self.start == self.buf.len() {
                        self.buf.clear();
                        self.start = 0;
                    }
                    if fr.seq != 0 && proto::seq::gt(fr.seq, self.last_seq) {
                        self.last_seq = fr.seq;
                    }
                    return Event::Frame(fr);
                }
                Ok(Decoded::NeedMore(_)) => {}
                Err(e) => panic!("server sent a broken frame: {e}"),
            }
            if self.eof {
                assert_eq!(
                    self.start,
                    self.buf.len(),
                    "EOF in the middle of a frame ({} bytes left)",
                    self.buf.len() - self.start
                );
                return Event::Closed;
            }
            let now = Instant::now();
            if now >= deadline {
                return Event::Timeout;
            }
            if self.start > 0 && self.start > self.buf.len() / 2 {
                self.buf.drain(..self.start);
                self.start = 0;
            }
            self.stream
                .set_read_timeout(Some((deadline - now).max(ms(1))))
                .unwrap();
            let len = self.buf.len();
            self.buf.resize(len + (1 << 17), 0);
            match self.stream.read(&mut self.buf[len..]) {
                Ok(0) => {
                    self.buf.truncate(len);
                    self.eof = true;
                }
                Ok(n) => self.buf.truncate(len + n),
                Err(e) => {
                    self.buf.truncate(len);
                    match e.kind() {
                        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted => {}
                        ErrorKind::ConnectionReset | ErrorKind::BrokenPipe => self.eof = true,
                        _ => panic!("read: {e}"),
                    }
                }
            }
        }
    }

    /// The next frame within [`TIMEOUT`], skipping KEEPALIVEs and server ACKs.
    pub fn recv(&mut self) -> Frame {
        self.recv_within(TIMEOUT)
    }

    pub fn recv_within(&mut self, t: Duration) -> Frame {
        let deadline = Instant::now() + t;
        loop {
            match self.recv_event(deadline.saturating_duration_since(Instant::now())) {
                Event::Frame(f) if matches!(f.ty, FrameType::Keepalive | FrameType::Ack) => {}
                Event::Frame(f) => return f,
                Event::Closed => panic!("connection closed while waiting for a frame"),
                Event::Timeout => panic!("no frame within {t:?} (sid {:#x})", self.sid),
            }
        }
    }

    /// Expects the next frame to be DATA and returns its payload.
    pub fn recv_data(&mut self) -> Vec<u8> {
        let f = self.recv();
        assert_eq!(f.ty, FrameType::Data, "expected DATA, got {f:?}");
        f.payload
    }

    /// Reads DATA until `want` bytes have arrived (frames may be split or merged by the agent).
    pub fn recv_bytes(&mut self, want: usize) -> Vec<u8> {
        let mut got = Vec::new();
        while got.len() < want {
            got.extend(self.recv_data());
        }
        got
    }

    /// Expects EOF within `t` (KEEPALIVEs are skipped).
    pub fn expect_closed(&mut self, t: Duration) {
        let deadline = Instant::now() + t;
        loop {
            match self.recv_event(deadline.saturating_duration_since(Instant::now())) {
                Event::Closed => return,
                Event::Frame(f) if f.ty == FrameType::Keepalive => {}
                Event::Frame(f) => panic!("expected EOF, got {f:?}"),
                Event::Timeout => panic!("connection not closed within {t:?}"),
            }
        }
    }

    /// Expects no frame (other than KEEPALIVE) for `t`.
    pub fn expect_silence(&mut self, t: Duration) {
        let deadline = Instant::now() + t;
        loop {
            match self.recv_event(deadline.saturating_duration_since(Instant::now())) {
                Event::Timeout => return,
                Event::Frame(f) if f.ty == FrameType::Keepalive => {}
                Event::Frame(f) => panic!("expected silence, got {f:?}"),
                Event::Closed => panic!("expected silence, got EOF"),
            }
        }
    }

    pub fn close(self) {
        let _ = self.stream.shutdown(Shutdown::Both);
    }
}

/// CONNECT to (TENANT, agent) on fresh connections until one is accepted or `t` runs out.
/// Returns the client and how many NO_AGENT refusals came first.
pub fn connect_until_accepted(addr: SocketAddr, agent: u32, t: Duration) -> (Client, u32) {
    let deadline = Instant::now() + t;
    let mut refusals = 0;
    loop {
        let mut c = Client::connect(addr);
        match c.try_connect(TENANT, agent) {
            Ok(_) => return (c, refusals),
            Err(E_NO_AGENT) => refusals += 1,
            Err(e) => panic!("CONNECT refused with ERROR {e}, expected ACCEPT or NO_AGENT"),
        }
        assert!(
            Instant::now() < deadline,
            "CONNECT to agent {agent} still refused with NO_AGENT after {t:?} ({refusals} tries)"
        );
        std::thread::sleep(ms(1));
    }
}

// ---------------------------------------------------------------------------------------------
// Fake pod

/// A pod-link message, owned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PodMsg {
    Hello {
        version: u8,
        name: String,
    },
    Open {
        tenant: u32,
        agent: u32,
        caps: u8,
        peer: String,
    },
    Reopen {
        tenant: u32,
        agent: u32,
        caps: u8,
        peer: String,
    },
    Data(Vec<u8>),
    Resize {
        cols: u16,
        rows: u16,
    },
    Detached,
    Attached,
    Close(u8),
    Pause,
    Continue,
    Export,
    State(Vec<u8>),
    Unknown(u8),
    /// The daemon sent bytes that are not a valid message (the fake pod closes the link).
    Broken(String),
}

impl PodMsg {
    fn from_msg(m: &Msg<'_>) -> PodMsg {
        match m {
            Msg::Hello { version, name } => PodMsg::Hello {
                version: *version,
                name: name.to_string(),
            },
            Msg::Open(o) => PodMsg::Open {
                tenant: o.tenant,
                agent: o.agent,
                caps: o.client_caps,
                peer: o.peer.to_string(),
            },
            Msg::Reopen(o) => PodMsg::Reopen {
                tenant: o.tenant,
                agent: o.agent,
                caps: o.client_caps,
                peer: o.peer.to_string(),
            },
            Msg::Data(d) => PodMsg::Data(d.to_vec()),
            Msg::Resize { cols, rows } => PodMsg::Resize {
                cols: *cols,
                rows: *rows,
            },
            Msg::Detached => PodMsg::Detached,
            Msg::Attached => PodMsg::Attached,
            Msg::Close(r) => PodMsg::Close(r.code()),
            Msg::Pause => PodMsg::Pause,
            Msg::Continue => PodMsg::Continue,
            Msg::Export => PodMsg::Export,
            Msg::State(b) => PodMsg::State(b.to_vec()),
            Msg::Unknown { ty, .. } => PodMsg::Unknown(*ty),
        }
    }
}

/// One message the fake pod received: on which of its accepted links, for which session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodEvent {
    pub link: usize,
    pub sid: u32,
    pub msg: PodMsg,
}

/// A pod of our own: listens on `DIR/T_A`, sends HELLO on every accepted link at once, records
/// every message it receives, and (when `echo`) returns each DATA as one DATA.
pub struct FakePod {
    pub path: PathBuf,
    rx: mpsc::Receiver<PodEvent>,
    stop: Arc<AtomicBool>,
    accepted: Arc<AtomicUsize>,
    links: Arc<Mutex<Vec<UnixStream>>>,
    acceptor: Option<JoinHandle<()>>,
}

impl FakePod {
    /// Binds `DIR/T_A`, replacing a stale socket file there.
    pub fn start(dir: &Path, tenant: u32, agent: u32, echo: bool) -> FakePod {
        FakePod::start_with(dir, tenant, agent, echo, Duration::ZERO)
    }

    /// Like [`FakePod::start`], but calls listen() only `listen_delay` after bind() (which is
    /// what creates the socket file): connecting in between is refused, as with any pod
    /// between its bind() and listen().
    pub fn start_with(
        dir: &Path,
        tenant: u32,
        agent: u32,
        echo: bool,
        listen_delay: Duration,
    ) -> FakePod {
        let path = dir.join(format!("{tenant}_{agent}"));
        let _ = std::fs::remove_file(&path);
        let listener = bind_then_listen(&path, listen_delay);
        listener.set_nonblocking(true).unwrap();
        let (tx, rx) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicUsize::new(0));
        let links: Arc<Mutex<Vec<UnixStream>>> = Arc::new(Mutex::new(Vec::new()));
        let acceptor = {
            let (stop, accepted, links) = (stop.clone(), accepted.clone(), links.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((s, _)) => {
                            s.set_nonblocking(false).unwrap();
                            let idx = accepted.fetch_add(1, Ordering::SeqCst);
                            links.lock().unwrap().push(s.try_clone().unwrap());
                            let tx = tx.clone();
                            std::thread::spawn(move || serve_fake_link(s, idx, echo, tx));
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => {
                            std::thread::sleep(ms(1));
                        }
                        Err(e) => panic!("fake pod accept: {e}"),
                    }
                }
            })
        };
        FakePod {
            path,
            rx,
            stop,
            accepted,
            links,
            acceptor: Some(acceptor),
        }
    }

    /// Links accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// The next message, within `t`.
    pub fn recv(&self, t: Duration) -> Option<PodEvent> {
        self.rx.recv_timeout(t).ok()
    }

    /// The next message within [`TIMEOUT`]; panics otherwise.
    pub fn expect(&self, what: &str) -> PodEvent {
        self.recv(TIMEOUT)
            .unwrap_or_else(|| panic!("fake pod: no message within {TIMEOUT:?}, expected {what}"))
    }

    /// Every message that arrives within `t`.
    pub fn drain(&self, t: Duration) -> Vec<PodEvent> {
        let deadline = Instant::now() + t;
        let mut v = Vec::new();
        while let Some(e) = self.recv(deadline.saturating_duration_since(Instant::now())) {
            v.push(e);
        }
        v
    }
}

impl Drop for FakePod {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.acceptor.take() {
            let _ = h.join();
        }
        for s in self.links.lock().unwrap().iter() {
            let _ = s.shutdown(Shutdown::Both);
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// socket(), bind() (the file appears), sleep `delay`, listen().
fn bind_then_listen(path: &Path, delay: Duration) -> UnixListener {
    use std::os::fd::FromRawFd;
    use std::os::unix::ffi::OsStrExt;
    // SAFETY: plain socket syscalls on a fresh descriptor that the UnixListener then owns; the
    // zeroed sockaddr_un is valid, filled within its bounds (the length is checked) and lives
    // on the stack for the calls.
    unsafe {
        let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket(): {}", std::io::Error::last_os_error());
        let mut addr: libc::sockaddr_un = std::mem::zeroed();
        addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
        let bytes = path.as_os_str().as_bytes();
        assert!(bytes.len() < addr.sun_path.len(), "socket path too long");
        for (i, &b) in bytes.iter().enumerate() {
            addr.sun_path[i] = b as libc::c_char;
        }
        let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
        let r = libc::bind(
            fd,
            &addr as *const libc::sockaddr_un as *const libc::sockaddr,
            len as libc::socklen_t,
        );
        assert_eq!(r, 0, "bind(): {}", std::io::Error::last_os_error());
        if !delay.is_zero() {
            std::thread::sleep(delay);
        }
        assert_eq!(
            libc::listen(fd, 128),
            0,
            "listen(): {}",
            std::io::Error::last_os_error()
        );
        UnixListener::from_raw_fd(fd)
    }
}

fn serve_fake_link(mut s: UnixStream, link: usize, echo: bool, tx: mpsc::Sender<PodEvent>) {
    let mut w = s.try_clone().unwrap();
    let mut hello = Vec::new();
    podlink::encode(
        &mut hello,
        0,
        &Msg::Hello {
            version: 1,
            name: "fake pod",
        },
    );
    if w.write_all(&hello).is_err() {
        return;
    }
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 1 << 16];
    loop {
        let n = match s.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        buf.extend_from_slice(&chunk[..n]);
        let mut off = 0;
        let mut out = Vec::new();
        loop {
            match podlink::decode(&buf[off..]) {
                Ok(podlink::Decoded::Msg {
                    session_id,
                    msg,
                    used,
                }) => {
                    if echo {
                        if let Msg::Data(d) = &msg {
                            podlink::encode(&mut out, session_id, &Msg::Data(d));
                        }
                    }
                    let ev = PodEvent {
                        link,
                        sid: session_id,
                        msg: PodMsg::from_msg(&msg),
                    };
                    off += used;
                    let _ = tx.send(ev);
                }
                Ok(podlink::Decoded::NeedMore(_)) => break,
                Err(e) => {
                    let _ = tx.send(PodEvent {
                        link,
                        sid: 0,
                        msg: PodMsg::Broken(e.to_string()),
                    });
                    return;
                }
            }
        }
        buf.drain(..off);
        if !out.is_empty() && w.write_all(&out).is_err() {
            return;
        }
    }
}
