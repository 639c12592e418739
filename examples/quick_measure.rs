//! Quick measurement of two figures against a real `clawtermd` (loopback, plaintext, no auth):
//!
//! 1. **RSS per idle session**: one shard pinned to CPU 0 and an echo agent pod; N sessions are
//!    opened (CONNECT → ACCEPT, a bounded number of handshakes in flight), and the server's
//!    VmRSS growth divided by N is reported, with the agent pod's RSS. A sample of 100 sessions
//!    then echoes one DATA frame each to show the sessions are alive.
//! 2. **Echo round trips per second through one shard**: 1,000 sessions in a closed loop (one
//!    outstanding 32-byte DATA each; on every echo the client sends a cumulative ACK and the next
//!    DATA). The client is single-threaded (nonblocking sockets + epoll) and pinned to CPU 1.
//!
//! Both figures are taken for each I/O backend (`--io uring|epoll|both`, default both), each
//! with a fresh server and agent.
//!
//! ```text
//! cargo build --release --bins
//! cargo run --release --example quick_measure -- [--sessions N] [--echo-sessions N]
//!     [--duration S] [--io uring|epoll|both] [--inflight N] [--json] [--keep-logs]
//! ```
//!
//! Progress goes to stderr; a summary table to stdout (a JSON object with `--json`). The server
//! and agent binaries are taken from the directory above this example's executable
//! (`target/release`), or from `--bin-dir DIR`. Client sockets are spread over the source
//! addresses 127.0.0.2..=127.0.0.9 so that large N does not run out of ephemeral ports.

use clawterm::proto::payload::CapsWidth;
use clawterm::proto::{
    decode, encode_to_vec, Accept, Connect, Decoded, FrameType, CAP_V1, MAX_PAYLOAD,
};
use std::collections::BTreeMap;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

#[path = "../tests/harness/mod.rs"]
mod harness;

use harness::{proc_cpu_s, raise_nofile};

const TENANT: u32 = 1;
const AGENT: u32 = 1;
const PAYLOAD_LEN: usize = 32;
const PROBES: usize = 100;

// ------------------------------------------------------------------------------------------
// Options

struct Opts {
    sessions: usize,
    echo_sessions: usize,
    duration: f64,
    io: Vec<&'static str>,
    inflight: usize,
    json: bool,
    keep_logs: bool,
    bin_dir: Option<PathBuf>,
}

const USAGE: &str = "usage: quick_measure [--sessions N] [--echo-sessions N] [--duration S] \
[--io uring|epoll|both] [--inflight N] [--json] [--keep-logs] [--bin-dir DIR]";

fn parse_args() -> Result<Opts, String> {
    let mut o = Opts {
        sessions: 10_000,
        echo_sessions: 1_000,
        duration: 5.0,
        io: vec!["uring", "epoll"],
        inflight: 200,
        json: false,
        keep_logs: false,
        bin_dir: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = |name: &str| args.next().ok_or(format!("{name} needs a value\n{USAGE}"));
        match a.as_str() {
            "--sessions" => o.sessions = num(&val("--sessions")?)?,
            "--echo-sessions" => o.echo_sessions = num(&val("--echo-sessions")?)?,
            "--inflight" => o.inflight = num::<usize>(&val("--inflight")?)?.max(1),
            "--duration" => {
                let v = val("--duration")?;
                o.duration = v
                    .parse::<f64>()
                    .ok()
                    .filter(|d| d.is_finite() && *d > 0.0 && *d <= 600.0)
                    .ok_or(format!(
                        "--duration: `{v}` is not a number of seconds in (0, 600]"
                    ))?;
            }
            "--io" => {
                o.io = match val("--io")?.as_str() {
                    "uring" => vec!["uring"],
                    "epoll" => vec!["epoll"],
                    "both" => vec!["uring", "epoll"],
                    other => return Err(format!("--io: `{other}` is not uring, epoll or both")),
                }
            }
            "--json" => o.json = true,
            "--keep-logs" => o.keep_logs = true,
            "--bin-dir" => o.bin_dir = Some(PathBuf::from(val("--bin-dir")?)),
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument `{other}`\n{USAGE}")),
        }
    }
    if o.sessions == 0 && o.echo_sessions == 0 {
        return Err("nothing to measure: --sessions and --echo-sessions are both 0".into());
    }
    Ok(o)
}

fn num<T: std::str::FromStr>(s: &str) -> Result<T, String> {
    s.parse()
        .map_err(|_| format!("`{s}` is not a non-negative integer"))
}

macro_rules! progress {
    ($($t:tt)*) => {{ eprintln!("[quick_measure] {}", format!($($t)*)); }};
}

// ------------------------------------------------------------------------------------------
// OS helpers (libc)

fn errno_str() -> String {
    std::io::Error::last_os_error().to_string()
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn get_affinity() -> Option<libc::cpu_set_t> {
    // SAFETY: cpu_set_t is plain data; the kernel writes at most its size.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        (libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) == 0)
            .then_some(set)
    }
}

/// Pins the calling thread to `cpu`.
fn pin_to(cpu: usize) -> Result<(), String> {
    harness::pin_thread(cpu)
}

fn online_cpus() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// VmRSS of `pid` in bytes.
fn vm_rss(pid: u32) -> Option<u64> {
    Some(harness::rss_kib(pid)? * 1024)
}

/// CPU seconds used by the calling thread.
fn thread_cpu_s() -> f64 {
    // SAFETY: getrusage writes into a plain struct.
    unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_THREAD, &mut ru);
        let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        tv(ru.ru_utime) + tv(ru.ru_stime)
    }
}

// ------------------------------------------------------------------------------------------
// Child processes

/// A child process that is stopped (SIGTERM, then SIGKILL) when dropped.
struct Guard {
    child: Option<Child>,
    name: &'static str,
}

impl Guard {
    fn spawn(
        name: &'static str,
        mut cmd: Command,
        mask: Option<libc::cpu_set_t>,
    ) -> Result<Guard, String> {
        // SAFETY: the closure runs between fork and exec and only makes async-signal-safe
        // syscalls: give the child the tool's original CPU mask (the tool's own thread is
        // pinned) and kill it if the tool dies.
        unsafe {
            cmd.pre_exec(move || {
                if let Some(m) = mask {
                    libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &m);
                }
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {name}: {e}"))?;
        Ok(Guard {
            child: Some(child),
            name,
        })
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// `Ok(())` while running; otherwise how it ended.
    fn check(&mut self) -> Result<(), String> {
        match self.child.as_mut().map(|c| c.try_wait()) {
            Some(Ok(None)) => Ok(()),
            Some(Ok(Some(st))) => Err(format!("{} exited unexpectedly: {st}", self.name)),
            Some(Err(e)) => Err(format!("{}: wait failed: {e}", self.name)),
            None => Err(format!("{} already stopped", self.name)),
        }
    }

    /// SIGTERM, wait up to `grace`, then SIGKILL. Says how it went.
    fn stop(&mut self, grace: Duration) -> String {
        let Some(mut c) = self.child.take() else {
            return "not running".into();
        };
        if let Ok(Some(st)) = c.try_wait() {
            return format!("had already exited ({st})");
        }
        let t = Instant::now();
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGTERM) };
        while t.elapsed() < grace {
            if let Ok(Some(st)) = c.try_wait() {
                return format!(
                    "exited after SIGTERM in {} ms ({st})",
                    t.elapsed().as_millis()
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = c.kill();
        let _ = c.wait();
        format!(
            "did NOT exit within {} ms of SIGTERM: killed with SIGKILL",
            grace.as_millis()
        )
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.stop(Duration::from_secs(2));
        }
    }
}

struct Bins {
    server: PathBuf,
    agent: PathBuf,
}

fn find_bins(o: &Opts) -> Result<Bins, String> {
    let dir = match &o.bin_dir {
        Some(d) => d.clone(),
        None => std::env::current_exe()
            .ok()
            .and_then(|p| p.parent()?.parent().map(Path::to_path_buf))
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/release")),
    };
    let b = Bins {
        server: dir.join("clawtermd"),
        agent: dir.join("claw-agent"),
    };
    for p in [&b.server, &b.agent] {
        if !p.is_file() {
            return Err(format!(
                "{} not found: build it first with `cargo build --release --bins` (or pass --bin-dir)",
                p.display()
            ));
        }
    }
    Ok(b)
}

/// A server (1 shard on CPU 0) and an echo agent pod for tenant 1, agent 1.
struct Env {
    // Field order = drop order: the server goes first.
    server: Guard,
    agent: Guard,
    addr: SocketAddrV4,
    notable: Arc<Mutex<Vec<String>>>,
}

impl Env {
    fn start(
        bins: &Bins,
        io: &str,
        dir: PathBuf,
        mask: Option<libc::cpu_set_t>,
    ) -> Result<Env, String> {
        let sock = dir.join("sock");
        fs::create_dir_all(&sock).map_err(|e| format!("{}: {e}", sock.display()))?;
        let mut cmd = Command::new(&bins.server);
        cmd.args(["--bind", "127.0.0.1", "--port", "0", "--insecure-plaintext"])
            .args(["--insecure-no-auth", "--shards", "1", "--cpus", "0"])
            .args(["--io", io, "--admin", "off", "--no-quic", "--socket-dir"])
            .arg(&sock)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut server = Guard::spawn("clawtermd", cmd, mask)?;
        let stderr = server.child.as_mut().and_then(|c| c.stderr.take()).unwrap();
        let notable = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        {
            let notable = Arc::clone(&notable);
            let log_path = dir.join("clawtermd.log");
            std::thread::spawn(move || {
                let mut log = fs::File::create(log_path).ok();
                let mut sent = false;
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    if let Some(l) = log.as_mut() {
                        let _ = writeln!(l, "{line}");
                    }
                    if !sent {
                        if let Some(port) = parse_listen_port(&line) {
                            let _ = tx.send(port);
                            sent = true;
                        }
                    }
                    if line.contains(" WARN ")
                        || line.contains(" ERROR ")
                        || line.contains("panicked")
                    {
                        let mut n = notable.lock().unwrap();
                        if n.len() < 50 {
                            n.push(line);
                        }
                    }
                }
            });
        }
        let port = match rx.recv_timeout(Duration::from_secs(10)) {
            Ok(p) => p,
            Err(_) => {
                let why = server
                    .check()
                    .err()
                    .unwrap_or_else(|| "no `listening on tcp` line within 10 s".into());
                let log = fs::read_to_string(dir.join("clawtermd.log")).unwrap_or_default();
                return Err(format!("clawtermd --io {io} did not start: {why}\n{log}"));
            }
        };
        let alog = fs::File::create(dir.join("claw-agent.log")).map_err(|e| e.to_string())?;
        let mut cmd = Command::new(&bins.agent);
        cmd.arg("-s")
            .arg(&sock)
            .args([
                "--tenant",
                &TENANT.to_string(),
                "--agent",
                &AGENT.to_string(),
                "echo",
            ])
            .stdin(Stdio::null())
            .stdout(alog.try_clone().map_err(|e| e.to_string())?)
            .stderr(alog);
        let mut agent = Guard::spawn("claw-agent", cmd, mask)?;
        let path = sock.join(format!("{TENANT}_{AGENT}"));
        let t = Instant::now();
        while !path.exists() {
            agent.check()?;
            if t.elapsed() > Duration::from_secs(10) {
                return Err(format!(
                    "agent socket {} did not appear within 10 s",
                    path.display()
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(Env {
            server,
            agent,
            addr: SocketAddrV4::new(Ipv4Addr::LOCALHOST, port),
            notable,
        })
    }

    fn notable(&self) -> Vec<String> {
        self.notable.lock().unwrap().clone()
    }
}

fn parse_listen_port(line: &str) -> Option<u16> {
    harness::tcp_addr(line).map(|a| a.port())
}

// ------------------------------------------------------------------------------------------
// The client: many nonblocking sockets on one epoll, single-threaded.

#[derive(Copy, Clone, PartialEq, Eq, Debug)]
enum St {
    Connecting,
    AwaitAccept,
    Up,
    Dead,
}

struct Conn {
    fd: i32,
    st: St,
    sid: u32,
    tx_seq: u32,
    /// Handshake start, then when the outstanding DATA was sent.
    t: Instant,
    rbuf: Vec<u8>,
    wbuf: Vec<u8>,
    epollout: bool,
    outstanding: bool,
    /// SEQ (tag) of the outstanding DATA.
    expect: u32,
    /// Round trips completed while measuring.
    rt: u32,
}

enum Ev {
    Accept(Option<u32>),
    Data { seq: u32, ok: bool },
    Error(u16, String),
    Disconnect,
    Other(&'static str),
}

#[derive(PartialEq, Eq)]
enum Mode {
    Idle,
    Probe,
    Echo,
}

struct Client {
    ep: i32,
    dst: SocketAddrV4,
    conns: Vec<Conn>,
    next_src: usize,
    inflight: usize,
    accepted: usize,
    failures: BTreeMap<String, usize>,
    hs_us: Vec<u64>,
    mode: Mode,
    probe_ok: usize,
    bad_echo: usize,
    echo_run: bool,
    measuring: bool,
    rt: u64,
    lat_ns: Vec<u64>,
    other: BTreeMap<&'static str, usize>,
    scratch: Vec<u8>,
    fbuf: Vec<u8>,
    events: Vec<libc::epoll_event>,
}

fn src_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, 2 + (i % 8) as u8)
}

fn sockaddr(a: SocketAddrV4) -> libc::sockaddr_in {
    // SAFETY: sockaddr_in is plain data.
    let mut s: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    s.sin_family = libc::AF_INET as libc::sa_family_t;
    s.sin_port = a.port().to_be();
    s.sin_addr.s_addr = u32::from(*a.ip()).to_be();
    s
}

fn data_payload(tag: u32) -> [u8; PAYLOAD_LEN] {
    let mut p = [0u8; PAYLOAD_LEN];
    for c in p.chunks_mut(4) {
        c.copy_from_slice(&tag.to_be_bytes());
    }
    p
}

impl Client {
    fn new(dst: SocketAddrV4) -> Result<Client, String> {
        // SAFETY: plain syscall.
        let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if ep < 0 {
            return Err(format!("epoll_create1: {}", errno_str()));
        }
        Ok(Client {
            ep,
            dst,
            conns: Vec::new(),
            next_src: 0,
            inflight: 0,
            accepted: 0,
            failures: BTreeMap::new(),
            hs_us: Vec::new(),
            mode: Mode::Idle,
            probe_ok: 0,
            bad_echo: 0,
            echo_run: false,
            measuring: false,
            rt: 0,
            lat_ns: Vec::new(),
            other: BTreeMap::new(),
            scratch: vec![0u8; 64 * 1024],
            fbuf: Vec::with_capacity(256),
            events: vec![libc::epoll_event { events: 0, u64: 0 }; 1024],
        })
    }

    fn ctl(&self, op: i32, fd: i32, token: usize, events: u32) -> bool {
        let mut ev = libc::epoll_event {
            events,
            u64: token as u64,
        };
        // SAFETY: valid epoll fd and event struct.
        unsafe { libc::epoll_ctl(self.ep, op, fd, &mut ev) == 0 }
    }

    fn count_failure(&mut self, what: String) {
        *self.failures.entry(what).or_insert(0) += 1;
    }

    fn fail(&mut self, i: usize, why: String) {
        let c = &mut self.conns[i];
        let phase = match c.st {
            St::Dead => return,
            St::Connecting | St::AwaitAccept => {
                self.inflight -= 1;
                "handshake"
            }
            St::Up => "after ACCEPT",
        };
        c.st = St::Dead;
        let fd = std::mem::replace(&mut c.fd, -1);
        c.rbuf = Vec::new();
        c.wbuf = Vec::new();
        // SAFETY: our own fd, closed once (fd is set to -1 above).
        unsafe { libc::close(fd) };
        self.count_failure(format!("{phase}: {why}"));
    }

    /// Starts one connection; `Err` only for a fatal local problem (e.g. out of fds).
    fn start_one(&mut self) -> Result<(), String> {
        let src = src_ip(self.next_src);
        self.next_src += 1;
        // SAFETY: plain socket syscalls on a fresh fd with valid, sized arguments.
        unsafe {
            let fd = libc::socket(
                libc::AF_INET,
                libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
            );
            if fd < 0 {
                return Err(format!(
                    "socket(): {} (after {} sockets)",
                    errno_str(),
                    self.conns.len()
                ));
            }
            let one: libc::c_int = 1;
            let sz = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
            let p = &one as *const libc::c_int as *const libc::c_void;
            libc::setsockopt(fd, libc::IPPROTO_IP, libc::IP_BIND_ADDRESS_NO_PORT, p, sz);
            libc::setsockopt(fd, libc::IPPROTO_TCP, libc::TCP_NODELAY, p, sz);
            let sa = sockaddr(SocketAddrV4::new(src, 0));
            let salen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            if libc::bind(fd, &sa as *const _ as *const libc::sockaddr, salen) != 0 {
                let e = errno_str();
                libc::close(fd);
                self.count_failure(format!("handshake: bind {src}: {e}"));
                return Ok(());
            }
            let da = sockaddr(self.dst);
            let r = libc::connect(fd, &da as *const _ as *const libc::sockaddr, salen);
            let now_connected = r == 0;
            if r != 0 && errno() != libc::EINPROGRESS {
                let e = errno_str();
                libc::close(fd);
                self.count_failure(format!("handshake: connect from {src}: {e}"));
                return Ok(());
            }
            let i = self.conns.len();
            self.conns.push(Conn {
                fd,
                st: St::Connecting,
                sid: 0,
                tx_seq: 0,
                t: Instant::now(),
                rbuf: Vec::new(),
                wbuf: Vec::new(),
                epollout: !now_connected,
                outstanding: false,
                expect: 0,
                rt: 0,
            });
            self.inflight += 1;
            let evs = libc::EPOLLIN as u32
                | if now_connected {
                    0
                } else {
                    libc::EPOLLOUT as u32
                };
            if !self.ctl(libc::EPOLL_CTL_ADD, fd, i, evs) {
                let e = errno_str();
                self.fail(i, format!("epoll_ctl: {e}"));
                return Ok(());
            }
            if now_connected {
                self.send_connect(i);
            }
        }
        Ok(())
    }

    fn send_connect(&mut self, i: usize) {
        let mut nonce = [0u8; 16];
        nonce[..8].copy_from_slice(&(i as u64).to_be_bytes());
        let mut p = Vec::with_capacity(58);
        Connect {
            version: 1,
            caps: CAP_V1,
            caps_width: CapsWidth::U8,
            tenant_id: TENANT,
            agent_id: AGENT,
            token: [0; 32],
            nonce,
        }
        .encode(&mut p);
        let mut buf = std::mem::take(&mut self.fbuf);
        buf.clear();
        let c = &mut self.conns[i];
        c.tx_seq = 1;
        c.st = St::AwaitAccept;
        encode_to_vec(&mut buf, 0, c.tx_seq, FrameType::Connect, 0, &p);
        self.send(i, &buf);
        self.fbuf = buf;
    }

    /// Sends an optional cumulative ACK and then one 32-byte DATA.
    fn send_data(&mut self, i: usize, ack: Option<u32>) {
        let mut buf = std::mem::take(&mut self.fbuf);
        buf.clear();
        let c = &mut self.conns[i];
        if let Some(s) = ack {
            c.tx_seq = c.tx_seq.wrapping_add(1);
            encode_to_vec(
                &mut buf,
                c.sid,
                c.tx_seq,
                FrameType::Ack,
                0,
                &s.to_be_bytes(),
            );
        }
        c.tx_seq = c.tx_seq.wrapping_add(1);
        c.expect = c.tx_seq;
        encode_to_vec(
            &mut buf,
            c.sid,
            c.tx_seq,
            FrameType::Data,
            0,
            &data_payload(c.tx_seq),
        );
        c.outstanding = true;
        c.t = Instant::now();
        self.send(i, &buf);
        self.fbuf = buf;
    }

    fn send(&mut self, i: usize, bytes: &[u8]) {
        let c = &mut self.conns[i];
        if c.st == St::Dead {
            return;
        }
        let mut from = 0;
        if c.wbuf.is_empty() {
            // SAFETY: writing from a valid slice to our own fd.
            let n =
                unsafe { libc::write(c.fd, bytes.as_ptr() as *const libc::c_void, bytes.len()) };
            if n < 0 {
                let e = errno();
                if e != libc::EAGAIN {
                    let s = errno_str();
                    self.fail(i, format!("write: {s}"));
                    return;
                }
            } else {
                from = n as usize;
            }
            if from == bytes.len() {
                return;
            }
        }
        let c = &mut self.conns[i];
        c.wbuf.extend_from_slice(&bytes[from..]);
        if !c.epollout {
            c.epollout = true;
            let fd = c.fd;
            self.ctl(
                libc::EPOLL_CTL_MOD,
                fd,
                i,
                (libc::EPOLLIN | libc::EPOLLOUT) as u32,
            );
        }
    }

    fn flush(&mut self, i: usize) {
        let c = &mut self.conns[i];
        while !c.wbuf.is_empty() {
            // SAFETY: as in `send`.
            let n =
                unsafe { libc::write(c.fd, c.wbuf.as_ptr() as *const libc::c_void, c.wbuf.len()) };
            if n < 0 {
                if errno() == libc::EAGAIN {
                    return;
                }
                let s = errno_str();
                self.fail(i, format!("write: {s}"));
                return;
            }
            c.wbuf.drain(..n as usize);
        }
        c.epollout = false;
        let fd = c.fd;
        self.ctl(libc::EPOLL_CTL_MOD, fd, i, libc::EPOLLIN as u32);
    }

    /// Waits up to `timeout_ms` for events and handles them.
    fn poll(&mut self, timeout_ms: i32) {
        let mut evs = std::mem::take(&mut self.events);
        // SAFETY: `evs` is a valid buffer of `evs.len()` events.
        let n =
            unsafe { libc::epoll_wait(self.ep, evs.as_mut_ptr(), evs.len() as i32, timeout_ms) };
        for ev in evs.iter().take(n.max(0) as usize) {
            let (i, flags) = (ev.u64 as usize, ev.events);
            let st = self.conns[i].st;
            if st == St::Dead {
                continue;
            }
            if st == St::Connecting {
                let mut err: libc::c_int = 0;
                let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
                // SAFETY: valid out-pointers of the right size.
                unsafe {
                    libc::getsockopt(
                        self.conns[i].fd,
                        libc::SOL_SOCKET,
                        libc::SO_ERROR,
                        &mut err as *mut _ as *mut libc::c_void,
                        &mut len,
                    )
                };
                if err != 0 {
                    let e = std::io::Error::from_raw_os_error(err);
                    self.fail(i, format!("connect: {e}"));
                } else if flags & libc::EPOLLOUT as u32 != 0 {
                    let c = &mut self.conns[i];
                    c.epollout = false;
                    let fd = c.fd;
                    self.ctl(libc::EPOLL_CTL_MOD, fd, i, libc::EPOLLIN as u32);
                    self.send_connect(i);
                }
                continue;
            }
            if flags & libc::EPOLLOUT as u32 != 0 {
                self.flush(i);
            }
            if flags & (libc::EPOLLIN | libc::EPOLLERR | libc::EPOLLHUP) as u32 != 0 {
                self.read_ready(i);
            }
        }
        self.events = evs;
    }

    fn read_ready(&mut self, i: usize) {
        loop {
            if self.conns[i].st == St::Dead {
                return;
            }
            let fd = self.conns[i].fd;
            // SAFETY: reading into our own scratch buffer.
            let n = unsafe {
                libc::read(
                    fd,
                    self.scratch.as_mut_ptr() as *mut libc::c_void,
                    self.scratch.len(),
                )
            };
            if n == 0 {
                self.fail(i, "server closed the connection (EOF)".into());
                return;
            }
            if n < 0 {
                if errno() != libc::EAGAIN {
                    let s = errno_str();
                    self.fail(i, format!("read: {s}"));
                }
                return;
            }
            let n = n as usize;
            self.conns[i].rbuf.extend_from_slice(&self.scratch[..n]);
            self.frames(i);
            if n < self.scratch.len() {
                return;
            }
        }
    }

    fn frames(&mut self, i: usize) {
        let mut off = 0;
        loop {
            let expect = data_payload(self.conns[i].expect);
            let ev = {
                let rb = &self.conns[i].rbuf[off..];
                match decode(rb, MAX_PAYLOAD) {
                    Ok(Decoded::NeedMore(_)) => break,
                    Err(e) => {
                        self.fail(i, format!("undecodable bytes from the server: {e}"));
                        return;
                    }
                    Ok(Decoded::Frame(f, used)) => {
                        off += used;
                        match f.ty {
                            FrameType::Accept => {
                                Ev::Accept(Accept::parse(f.payload).ok().map(|a| a.session_id))
                            }
                            FrameType::Data => Ev::Data {
                                seq: f.seq,
                                ok: f.payload == expect,
                            },
                            FrameType::Error => {
                                let code = if f.payload.len() >= 2 {
                                    u16::from_be_bytes([f.payload[0], f.payload[1]])
                                } else {
                                    0
                                };
                                let msg =
                                    String::from_utf8_lossy(f.payload.get(2..).unwrap_or(&[]));
                                Ev::Error(code, msg.into_owned())
                            }
                            FrameType::Disconnect => Ev::Disconnect,
                            t => Ev::Other(t.name()),
                        }
                    }
                }
            };
            self.handle(i, ev);
            if self.conns[i].st == St::Dead {
                return;
            }
        }
        let rb = &mut self.conns[i].rbuf;
        if off == rb.len() {
            rb.clear();
        } else {
            rb.drain(..off);
        }
    }

    fn handle(&mut self, i: usize, ev: Ev) {
        match ev {
            Ev::Accept(sid) => {
                let c = &mut self.conns[i];
                match (c.st, sid) {
                    (St::AwaitAccept, Some(sid)) => {
                        c.st = St::Up;
                        c.sid = sid;
                        self.hs_us.push(c.t.elapsed().as_micros() as u64);
                        self.inflight -= 1;
                        self.accepted += 1;
                    }
                    _ => self.fail(i, "unexpected or short ACCEPT".into()),
                }
            }
            Ev::Data { seq, ok } => {
                let now = Instant::now();
                let c = &mut self.conns[i];
                if !c.outstanding {
                    *self.other.entry("DATA (unsolicited)").or_insert(0) += 1;
                    return;
                }
                c.outstanding = false;
                if !ok {
                    self.bad_echo += 1;
                }
                match self.mode {
                    Mode::Probe => self.probe_ok += ok as usize,
                    Mode::Echo => {
                        if self.measuring {
                            self.rt += 1;
                            c.rt += 1;
                            self.lat_ns.push(now.duration_since(c.t).as_nanos() as u64);
                        }
                        if self.echo_run {
                            self.send_data(i, Some(seq));
                        }
                    }
                    Mode::Idle => {}
                }
            }
            Ev::Error(code, msg) => self.fail(i, format!("ERROR frame code {code} `{msg}`")),
            Ev::Disconnect => self.fail(i, "DISCONNECT from the server".into()),
            Ev::Other(name) => *self.other.entry(name).or_insert(0) += 1,
        }
    }

    fn pump_until(&mut self, limit: Duration, done: impl Fn(&Client) -> bool) -> bool {
        let end = Instant::now() + limit;
        loop {
            if done(self) {
                return true;
            }
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            self.poll((left.as_millis() as i32).clamp(1, 20));
        }
    }

    /// Opens `n` more sessions, at most `max_inflight` handshakes at a time. Returns the time
    /// it took; failed handshakes are counted in `failures`.
    fn open(&mut self, n: usize, max_inflight: usize, limit: Duration) -> Result<Duration, String> {
        let t = Instant::now();
        let mut started = 0;
        let mut last = Instant::now();
        loop {
            while started < n && self.inflight < max_inflight {
                self.start_one()?;
                started += 1;
            }
            if started == n && self.inflight == 0 {
                return Ok(t.elapsed());
            }
            if t.elapsed() > limit {
                return Err(format!(
                    "gave up after {:.1} s: {} of {n} started, {} accepted, {} handshakes still pending (server stalled?)",
                    t.elapsed().as_secs_f64(),
                    started,
                    self.accepted,
                    self.inflight
                ));
            }
            if last.elapsed() > Duration::from_secs(2) {
                last = Instant::now();
                progress!("  ... {} sessions accepted", self.accepted);
            }
            self.poll(10);
        }
    }

    fn up(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.conns.len()).filter(|&i| self.conns[i].st == St::Up)
    }

    fn failures_text(&self) -> Vec<String> {
        self.failures
            .iter()
            .map(|(k, v)| format!("{v} x {k}"))
            .collect()
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        for c in &self.conns {
            if c.fd >= 0 {
                // SAFETY: our own fds, each closed once.
                unsafe { libc::close(c.fd) };
            }
        }
        // SAFETY: as above.
        unsafe { libc::close(self.ep) };
    }
}

/// Opens the first session, retrying while the server has not yet found the agent pod.
/// Returns the index of its connection.
fn warm_up(cl: &mut Client) -> Result<usize, String> {
    for _ in 0..50 {
        cl.open(1, 1, Duration::from_secs(10))?;
        if cl.accepted == 1 {
            cl.failures.clear();
            return Ok(cl.up().next().unwrap());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(format!(
        "the first session could not be opened: {}",
        cl.failures_text().join("; ")
    ))
}

// ------------------------------------------------------------------------------------------
// Figures

struct RssFig {
    sessions: usize,
    accepted: usize,
    open_s: f64,
    hs_p50_us: u64,
    hs_p99_us: u64,
    srv_before: u64,
    srv_after: u64,
    agent_before: u64,
    agent_after: u64,
    alive: usize,
    probe_sent: usize,
    probe_ok: usize,
    failures: Vec<String>,
    other_frames: Vec<String>,
    server_notable: Vec<String>,
    server_stop: String,
}

impl RssFig {
    fn per_session(&self) -> f64 {
        (self.srv_after as f64 - self.srv_before as f64) / self.accepted.max(1) as f64
    }
    fn agent_per_session(&self) -> f64 {
        (self.agent_after as f64 - self.agent_before as f64) / self.accepted.max(1) as f64
    }
}

struct EchoFig {
    sessions: usize,
    accepted: usize,
    secs: f64,
    rt: u64,
    p50_us: f64,
    p99_us: f64,
    p999_us: f64,
    max_us: f64,
    srv_cpu: f64,
    agent_cpu: f64,
    client_cpu: f64,
    stalled: usize,
    min_rt: u32,
    bad_echo: usize,
    failures: Vec<String>,
    other_frames: Vec<String>,
    server_notable: Vec<String>,
    server_stop: String,
}

impl EchoFig {
    fn rate(&self) -> f64 {
        self.rt as f64 / self.secs
    }
}

fn pct(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

fn others(cl: &Client) -> Vec<String> {
    cl.other.iter().map(|(k, v)| format!("{v} x {k}")).collect()
}

fn figure_rss(
    o: &Opts,
    bins: &Bins,
    io: &str,
    work: &Path,
    mask: Option<libc::cpu_set_t>,
) -> Result<RssFig, String> {
    progress!("[{io}] figure 1: starting clawtermd + echo agent");
    let mut env = Env::start(bins, io, work.join(format!("rss-{io}")), mask)?;
    let mut cl = Client::new(env.addr)?;
    let warm = warm_up(&mut cl)?;
    std::thread::sleep(Duration::from_millis(300));
    let srv_before = vm_rss(env.server.pid()).ok_or("cannot read the server's VmRSS")?;
    let agent_before = vm_rss(env.agent.pid()).ok_or("cannot read the agent's VmRSS")?;
    progress!(
        "[{io}] server RSS {} KiB, agent RSS {} KiB; opening {} sessions ({} handshakes in flight)",
        srv_before / 1024,
        agent_before / 1024,
        o.sessions,
        o.inflight
    );
    let limit = Duration::from_secs(60 + o.sessions as u64 / 100);
    let open = cl.open(o.sessions, o.inflight, limit);
    let accepted = cl.accepted - 1;
    let open_s = match open {
        Ok(d) => d.as_secs_f64(),
        Err(e) => {
            let alive = env.server.check().err().unwrap_or_default();
            return Err(format!("[{io}] opening sessions: {e} {alive}"));
        }
    };
    let mut hs = cl.hs_us[1..].to_vec();
    hs.sort_unstable();
    progress!(
        "[{io}] {accepted} of {} sessions accepted in {open_s:.2} s; waiting 1 s",
        o.sessions
    );
    cl.pump_until(Duration::from_secs(1), |_| false);
    env.server.check()?;
    let srv_after = vm_rss(env.server.pid()).ok_or("cannot read the server's VmRSS")?;
    let agent_after = vm_rss(env.agent.pid()).ok_or("cannot read the agent's VmRSS")?;
    // Liveness: one DATA on an evenly spread sample of sessions, each must come back.
    let up: Vec<usize> = cl.up().filter(|&i| i != warm).collect();
    let step = (up.len() / PROBES).max(1);
    let sample: Vec<usize> = up.iter().step_by(step).take(PROBES).copied().collect();
    cl.mode = Mode::Probe;
    for &i in &sample {
        cl.send_data(i, None);
    }
    let want = sample.len();
    cl.pump_until(Duration::from_secs(10), |c| c.probe_ok + c.bad_echo >= want);
    let alive = cl.up().filter(|&i| i != warm).count();
    progress!(
        "[{io}] server RSS {} KiB after; probe {}/{} echoed; {alive} sessions still up",
        srv_after / 1024,
        cl.probe_ok,
        want
    );
    env.server.check()?;
    let server_stop = env.server.stop(Duration::from_secs(10));
    let fig = RssFig {
        sessions: o.sessions,
        accepted,
        open_s,
        hs_p50_us: pct(&hs, 0.50),
        hs_p99_us: pct(&hs, 0.99),
        srv_before,
        srv_after,
        agent_before,
        agent_after,
        alive,
        probe_sent: want,
        probe_ok: cl.probe_ok,
        failures: cl.failures_text(),
        other_frames: others(&cl),
        server_notable: env.notable(),
        server_stop,
    };
    drop(env);
    drop(cl);
    Ok(fig)
}

fn figure_echo(
    o: &Opts,
    bins: &Bins,
    io: &str,
    work: &Path,
    mask: Option<libc::cpu_set_t>,
) -> Result<EchoFig, String> {
    progress!("[{io}] figure 2: starting clawtermd + echo agent");
    let mut env = Env::start(bins, io, work.join(format!("echo-{io}")), mask)?;
    let mut cl = Client::new(env.addr)?;
    let warm = warm_up(&mut cl)?;
    cl.open(
        o.echo_sessions,
        o.inflight,
        Duration::from_secs(60 + o.echo_sessions as u64 / 100),
    )
    .map_err(|e| format!("[{io}] opening echo sessions: {e}"))?;
    let accepted = cl.accepted - 1;
    let ids: Vec<usize> = cl.up().filter(|&i| i != warm).collect();
    progress!(
        "[{io}] {accepted} sessions up; closed loop: 1 s warm-up + {} s",
        o.duration
    );
    cl.mode = Mode::Echo;
    cl.echo_run = true;
    for &i in &ids {
        cl.send_data(i, None);
    }
    cl.pump_until(Duration::from_secs(1), |_| false);
    env.server.check()?;
    cl.lat_ns = Vec::with_capacity(4_000_000);
    let (s0, a0, c0) = (
        proc_cpu_s(env.server.pid()).unwrap_or(0.0),
        proc_cpu_s(env.agent.pid()).unwrap_or(0.0),
        thread_cpu_s(),
    );
    let t0 = Instant::now();
    cl.measuring = true;
    cl.pump_until(Duration::from_secs_f64(o.duration), |_| false);
    cl.measuring = false;
    let secs = t0.elapsed().as_secs_f64();
    let (s1, a1, c1) = (
        proc_cpu_s(env.server.pid()).unwrap_or(0.0),
        proc_cpu_s(env.agent.pid()).unwrap_or(0.0),
        thread_cpu_s(),
    );
    cl.echo_run = false;
    // Let the last round trips finish (not counted).
    cl.pump_until(Duration::from_millis(500), |c| {
        c.up().all(|i| !c.conns[i].outstanding)
    });
    env.server.check()?;
    let mut lat = std::mem::take(&mut cl.lat_ns);
    lat.sort_unstable();
    let us = |ns: u64| ns as f64 / 1000.0;
    let stalled = ids.iter().filter(|&&i| cl.conns[i].rt == 0).count();
    let min_rt = ids.iter().map(|&i| cl.conns[i].rt).min().unwrap_or(0);
    let fig = EchoFig {
        sessions: o.echo_sessions,
        accepted,
        secs,
        rt: cl.rt,
        p50_us: us(pct(&lat, 0.50)),
        p99_us: us(pct(&lat, 0.99)),
        p999_us: us(pct(&lat, 0.999)),
        max_us: us(lat.last().copied().unwrap_or(0)),
        srv_cpu: (s1 - s0) / secs,
        agent_cpu: (a1 - a0) / secs,
        client_cpu: (c1 - c0) / secs,
        stalled,
        min_rt,
        bad_echo: cl.bad_echo,
        failures: cl.failures_text(),
        other_frames: others(&cl),
        server_notable: env.notable(),
        server_stop: String::new(),
    };
    progress!(
        "[{io}] {:.0} round trips/s, p50 {:.0} us, p99 {:.0} us",
        fig.rate(),
        fig.p50_us,
        fig.p99_us
    );
    let server_stop = env.server.stop(Duration::from_secs(10));
    drop(env);
    drop(cl);
    Ok(EchoFig { server_stop, ..fig })
}

// ------------------------------------------------------------------------------------------
// Main

struct BackendResult {
    io: &'static str,
    rss: Result<RssFig, String>,
    echo: Result<EchoFig, String>,
}

fn main() {
    let o = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("quick_measure: {e}");
            std::process::exit(2);
        }
    };
    let bins = match find_bins(&o) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("quick_measure: {e}");
            std::process::exit(2);
        }
    };
    let nofile = raise_nofile();
    let need = o.sessions.max(o.echo_sessions) as u64 + 64;
    if nofile < need {
        eprintln!(
            "quick_measure: the open-file limit is {nofile}, {need} are needed: lower --sessions"
        );
        std::process::exit(2);
    }
    // Children get the original mask back (see Guard::spawn); the client thread runs on CPU 1.
    let mask = get_affinity();
    let cpus = online_cpus();
    let pinned = if cpus >= 2 {
        match pin_to(1) {
            Ok(()) => true,
            Err(e) => {
                progress!("cannot pin to CPU 1 ({e}); running unpinned");
                false
            }
        }
    } else {
        progress!("only {cpus} CPU: client and server share it");
        false
    };
    let work = std::env::temp_dir().join(format!("quick_measure.{}", std::process::id()));
    if let Err(e) = fs::create_dir_all(&work) {
        eprintln!("quick_measure: {}: {e}", work.display());
        std::process::exit(1);
    }
    progress!(
        "open-file limit {nofile}; {cpus} CPUs; server shard on CPU 0, client {}; logs in {}",
        if pinned { "on CPU 1" } else { "unpinned" },
        work.display()
    );

    let mut results = Vec::new();
    for &io in &o.io {
        let rss = if o.sessions > 0 {
            figure_rss(&o, &bins, io, &work, mask)
        } else {
            Err("skipped (--sessions 0)".into())
        };
        if let Err(e) = &rss {
            progress!("[{io}] figure 1 FAILED: {e}");
        }
        let echo = if o.echo_sessions > 0 {
            figure_echo(&o, &bins, io, &work, mask)
        } else {
            Err("skipped (--echo-sessions 0)".into())
        };
        if let Err(e) = &echo {
            progress!("[{io}] figure 2 FAILED: {e}");
        }
        results.push(BackendResult { io, rss, echo });
    }

    let trouble = results.iter().any(|r| {
        r.rss.as_ref().map_or(o.sessions > 0, |f| {
            !f.failures.is_empty() || !f.server_notable.is_empty() || f.alive != f.accepted
        }) || r.echo.as_ref().map_or(o.echo_sessions > 0, |f| {
            !f.failures.is_empty() || !f.server_notable.is_empty() || f.stalled > 0
        })
    });
    if o.json {
        print_json(&o, cpus, pinned, &results);
    } else {
        print_table(&o, cpus, pinned, &results);
    }
    if o.keep_logs || trouble {
        progress!("server and agent logs kept in {}", work.display());
    } else {
        let _ = fs::remove_dir_all(&work);
    }
    if results
        .iter()
        .any(|r| r.rss.is_err() && o.sessions > 0 || r.echo.is_err() && o.echo_sessions > 0)
    {
        std::process::exit(1);
    }
}

fn kib(b: u64) -> String {
    format!("{}", b / 1024)
}

fn print_table(o: &Opts, cpus: usize, pinned: bool, results: &[BackendResult]) {
    println!(
        "quick_measure: {cpus} CPUs, clawtermd --shards 1 --cpus 0 (plaintext, loopback), claw-agent echo; client single-threaded{}",
        if pinned { " on CPU 1" } else { "" }
    );
    println!();
    println!(
        "Figure 1: RSS per idle session ({} sessions opened, {} handshakes in flight)",
        o.sessions, o.inflight
    );
    println!(
        "{:<6} {:>9} {:>8} {:>9} {:>14} {:>21} {:>14} {:>19} {:>13} {:>8} {:>7}",
        "io",
        "accepted",
        "open s",
        "hs/s",
        "hs p50/p99 ms",
        "server RSS KiB",
        "server B/sess",
        "agent RSS KiB",
        "agent B/sess",
        "alive",
        "probe"
    );
    for r in results {
        match &r.rss {
            Ok(f) => {
                println!(
                "{:<6} {:>9} {:>8.2} {:>9.0} {:>14} {:>21} {:>14.0} {:>19} {:>13.0} {:>8} {:>7}",
                r.io,
                f.accepted,
                f.open_s,
                f.accepted as f64 / f.open_s,
                format!("{:.1}/{:.1}", f.hs_p50_us as f64 / 1e3, f.hs_p99_us as f64 / 1e3),
                format!("{} -> {}", kib(f.srv_before), kib(f.srv_after)),
                f.per_session(),
                format!("{} -> {}", kib(f.agent_before), kib(f.agent_after)),
                f.agent_per_session(),
                f.alive,
                format!("{}/{}", f.probe_ok, f.probe_sent),
            )
            }
            Err(e) => println!("{:<6} FAILED: {e}", r.io),
        }
    }
    println!();
    println!(
        "Figure 2: echo round trips through one shard ({} sessions, {}-byte DATA, 1 outstanding each, ACK + next DATA per echo; 1 s warm-up, then {} s)",
        o.echo_sessions, PAYLOAD_LEN, o.duration
    );
    println!(
        "{:<6} {:>9} {:>14} {:>9} {:>9} {:>10} {:>9} {:>11} {:>10} {:>11} {:>8}",
        "io",
        "sessions",
        "round trips/s",
        "p50 us",
        "p99 us",
        "p99.9 us",
        "max us",
        "server CPU",
        "agent CPU",
        "client CPU",
        "stalled"
    );
    for r in results {
        match &r.echo {
            Ok(f) => println!(
                "{:<6} {:>9} {:>14.0} {:>9.0} {:>9.0} {:>10.0} {:>9.0} {:>10.0}% {:>9.0}% {:>10.0}% {:>8}",
                r.io,
                f.accepted,
                f.rate(),
                f.p50_us,
                f.p99_us,
                f.p999_us,
                f.max_us,
                f.srv_cpu * 100.0,
                f.agent_cpu * 100.0,
                f.client_cpu * 100.0,
                f.stalled,
            ),
            Err(e) => println!("{:<6} FAILED: {e}", r.io),
        }
    }
    let mut notes = Vec::new();
    for r in results {
        if let Ok(f) = &r.rss {
            for x in &f.failures {
                notes.push(format!("[{}] figure 1 session failure: {x}", r.io));
            }
            for x in &f.other_frames {
                notes.push(format!("[{}] figure 1 other frames received: {x}", r.io));
            }
            for x in &f.server_notable {
                notes.push(format!("[{}] figure 1 server log: {x}", r.io));
            }
            notes.push(format!(
                "[{}] figure 1 server shutdown: {}",
                r.io, f.server_stop
            ));
        }
        if let Ok(f) = &r.echo {
            for x in &f.failures {
                notes.push(format!("[{}] figure 2 session failure: {x}", r.io));
            }
            for x in &f.other_frames {
                notes.push(format!("[{}] figure 2 other frames received: {x}", r.io));
            }
            for x in &f.server_notable {
                notes.push(format!("[{}] figure 2 server log: {x}", r.io));
            }
            if f.bad_echo > 0 {
                notes.push(format!(
                    "[{}] figure 2: {} echoes did not match what was sent",
                    r.io, f.bad_echo
                ));
            }
            notes.push(format!(
                "[{}] figure 2: {} round trips in {:.2} s; fewest per session {}; server shutdown: {}",
                r.io, f.rt, f.secs, f.min_rt, f.server_stop
            ));
        }
    }
    println!();
    for n in notes {
        println!("note: {n}");
    }
}

fn print_json(o: &Opts, cpus: usize, pinned: bool, results: &[BackendResult]) {
    use serde_json::{json, Value};
    let res: Vec<Value> = results
        .iter()
        .map(|r| {
            let rss = match &r.rss {
                Ok(f) => json!({
                    "sessions_requested": f.sessions,
                    "sessions_accepted": f.accepted,
                    "open_seconds": f.open_s,
                    "handshakes_per_second": f.accepted as f64 / f.open_s,
                    "handshake_p50_us": f.hs_p50_us,
                    "handshake_p99_us": f.hs_p99_us,
                    "server_rss_before_bytes": f.srv_before,
                    "server_rss_after_bytes": f.srv_after,
                    "server_rss_bytes_per_session": f.per_session(),
                    "agent_rss_before_bytes": f.agent_before,
                    "agent_rss_after_bytes": f.agent_after,
                    "agent_rss_bytes_per_session": f.agent_per_session(),
                    "sessions_alive_after": f.alive,
                    "probe_sent": f.probe_sent,
                    "probe_echoed": f.probe_ok,
                    "failures": f.failures,
                    "other_frames": f.other_frames,
                    "server_log_warnings": f.server_notable,
                    "server_shutdown": f.server_stop,
                }),
                Err(e) => json!({ "error": e }),
            };
            let echo = match &r.echo {
                Ok(f) => json!({
                    "sessions_requested": f.sessions,
                    "sessions_accepted": f.accepted,
                    "measured_seconds": f.secs,
                    "round_trips": f.rt,
                    "round_trips_per_second": f.rate(),
                    "latency_p50_us": f.p50_us,
                    "latency_p99_us": f.p99_us,
                    "latency_p999_us": f.p999_us,
                    "latency_max_us": f.max_us,
                    "server_cpu_fraction": f.srv_cpu,
                    "agent_cpu_fraction": f.agent_cpu,
                    "client_cpu_fraction": f.client_cpu,
                    "sessions_without_round_trip": f.stalled,
                    "fewest_round_trips_per_session": f.min_rt,
                    "mismatched_echoes": f.bad_echo,
                    "failures": f.failures,
                    "other_frames": f.other_frames,
                    "server_log_warnings": f.server_notable,
                    "server_shutdown": f.server_stop,
                }),
                Err(e) => json!({ "error": e }),
            };
            json!({ "io": r.io, "rss_per_idle_session": rss, "echo_round_trips": echo })
        })
        .collect();
    let v = json!({
        "tool": "quick_measure",
        "cpus": cpus,
        "client_pinned_to_cpu1": pinned,
        "server": "clawtermd --shards 1 --cpus 0 --insecure-plaintext --insecure-no-auth --admin off --no-quic",
        "params": {
            "sessions": o.sessions,
            "echo_sessions": o.echo_sessions,
            "duration_seconds": o.duration,
            "inflight_handshakes": o.inflight,
            "payload_bytes": PAYLOAD_LEN,
        },
        "results": res,
    });
    println!("{}", serde_json::to_string_pretty(&v).unwrap());
}
