//! Harness shared by the client tests: server, agent and a TCP proxy the tests can cut.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

pub const TENANT: u32 = 7;
pub const AGENT: u32 = 1;
pub const TOKEN: [u8; 32] = [0xAB; 32];

// ---------------------------------------------------------------------------------------------
// Harness

pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let d = std::env::temp_dir().join(format!(
            "ct-client-{}-{tag}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        TempDir(d)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A child process killed (SIGTERM, then SIGKILL) on drop.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Server + one agent. Drop order: server, agents, dir.
#[allow(dead_code)] // held for their Drop
pub struct Env {
    pub server: Proc,
    pub agents: Vec<Proc>,
    pub addr: SocketAddr,
    pub dir: TempDir,
}

impl Env {
    /// `mode`: claw-agent arguments after the ids (e.g. `["echo"]`).
    pub fn start(mode: &[&str]) -> Env {
        let dir = TempDir::new("env");
        let sock = dir.0.join("sock");
        std::fs::create_dir_all(&sock).unwrap();
        let tokens = dir.0.join("tokens");
        std::fs::write(&tokens, format!("{TENANT} {}\n", hex(&TOKEN))).unwrap();
        let agent = start_agent(&sock, AGENT, mode);
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_clawtermd"));
        cmd.args(["--bind", "127.0.0.1", "--port", "0", "--insecure-plaintext"])
            .arg("--tokens")
            .arg(&tokens)
            .arg("--socket-dir")
            .arg(&sock)
            .args(["--shards", "2", "--admin", "off", "--no-quic"])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, _) in std::env::vars() {
            if k.starts_with("CLAWTERM_") {
                cmd.env_remove(k);
            }
        }
        let mut child = cmd.spawn().expect("spawn clawtermd");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(i) = line.find("listening on tcp ") {
                    let a = line[i + 17..]
                        .split_whitespace()
                        .next()
                        .unwrap_or("")
                        .to_string();
                    let _ = tx.send(a);
                }
            }
        });
        let server = Proc(child);
        let addr = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("clawtermd did not report its address")
            .parse()
            .unwrap();
        Env {
            server,
            agents: vec![agent],
            addr,
            dir,
        }
    }

    pub fn endpoint(&self) -> String {
        self.addr.to_string()
    }
}

pub fn start_agent(sock: &Path, agent: u32, mode: &[&str]) -> Proc {
    let path = sock.join(format!("{TENANT}_{agent}"));
    let child = Command::new(env!("CARGO_BIN_EXE_claw-agent"))
        .arg("-s")
        .arg(sock)
        .args([
            "--tenant",
            &TENANT.to_string(),
            "--agent",
            &agent.to_string(),
        ])
        .args(mode)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn claw-agent");
    let mut p = Proc(child);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !path.exists() {
        assert!(p.0.try_wait().unwrap().is_none(), "claw-agent exited early");
        assert!(
            Instant::now() < deadline,
            "claw-agent socket never appeared"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    p
}

/// A TCP proxy that can be cut (every connection reset; new ones accepted and closed at once),
/// turned into a black hole (every connection reset; new ones accepted and then never
/// answered), stalled (every connection reset; no more accepts, so once its accept queue is
/// full new connects hang), and restored.
pub struct Proxy {
    pub addr: SocketAddr,
    pub cut: Arc<AtomicBool>,
    pub blackhole: Arc<AtomicBool>,
    pub stalled: Arc<AtomicBool>,
    pub conns: Arc<Mutex<Vec<TcpStream>>>,
    /// Connections accepted since the start (forwarded or not).
    pub accepted: Arc<AtomicU32>,
}

/// A loopback listener with the given accept-queue length (`listen(fd, backlog)`).
pub fn listener_with_backlog(backlog: i32) -> TcpListener {
    use std::os::fd::FromRawFd;
    // SAFETY: socket/bind/listen on a descriptor we own; the sockaddr_in is fully initialized
    // and passed with its size; the descriptor is then owned by the TcpListener.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let mut a: libc::sockaddr_in = std::mem::zeroed();
        a.sin_family = libc::AF_INET as libc::sa_family_t;
        a.sin_addr.s_addr = u32::from(std::net::Ipv4Addr::LOCALHOST).to_be();
        let r = libc::bind(
            fd,
            (&a as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        );
        assert_eq!(r, 0, "bind: {}", std::io::Error::last_os_error());
        assert_eq!(libc::listen(fd, backlog), 0, "listen");
        TcpListener::from_raw_fd(fd)
    }
}

impl Proxy {
    pub fn start(target: SocketAddr) -> Proxy {
        Proxy::start_with_backlog(target, 128)
    }

    /// A proxy whose listener has an accept queue of `backlog` (0: one connection), so that
    /// [`Proxy::stall`] plus [`Proxy::fill_queue`] make new connects hang.
    pub fn start_with_backlog(target: SocketAddr, backlog: i32) -> Proxy {
        let l = listener_with_backlog(backlog);
        l.set_nonblocking(true).unwrap();
        let addr = l.local_addr().unwrap();
        let cut = Arc::new(AtomicBool::new(false));
        let blackhole = Arc::new(AtomicBool::new(false));
        let stalled = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicU32::new(0));
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::new(Mutex::new(Vec::new()));
        let (c2, b2, s2, n2, a2) = (
            cut.clone(),
            blackhole.clone(),
            stalled.clone(),
            conns.clone(),
            accepted.clone(),
        );
        std::thread::spawn(move || loop {
            if s2.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(2));
                continue;
            }
            let client = match l.accept() {
                Ok((c, _)) => c,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(1));
                    continue;
                }
                Err(_) => continue,
            };
            let _ = client.set_nonblocking(false);
            a2.fetch_add(1, Ordering::SeqCst);
            let mut g = n2.lock().unwrap();
            if b2.load(Ordering::SeqCst) {
                // Held open, never read or answered (closed by the next cut or restore).
                g.push(client);
                continue;
            }
            if c2.load(Ordering::SeqCst) {
                let _ = client.shutdown(Shutdown::Both);
                continue;
            }
            let Ok(server) = TcpStream::connect(target) else {
                continue;
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            g.push(client.try_clone().unwrap());
            g.push(server.try_clone().unwrap());
            drop(g);
            pump(client.try_clone().unwrap(), server.try_clone().unwrap());
            pump(server, client);
        });
        Proxy {
            addr,
            cut,
            blackhole,
            stalled,
            conns,
            accepted,
        }
    }

    pub fn cut(&self) {
        let mut g = self.conns.lock().unwrap();
        self.cut.store(true, Ordering::SeqCst);
        for s in g.drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    /// Like [`Proxy::cut`], but new connections are accepted and then never answered (the
    /// server looks alive at the TCP level and silent above it).
    pub fn black_hole(&self) {
        let mut g = self.conns.lock().unwrap();
        self.blackhole.store(true, Ordering::SeqCst);
        for s in g.drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    /// Resets every connection and stops accepting: with the accept queue full (see
    /// [`Proxy::fill_queue`]) new connects hang, as with a host that drops everything.
    pub fn stall(&self) {
        let mut g = self.conns.lock().unwrap();
        self.stalled.store(true, Ordering::SeqCst);
        for s in g.drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    /// Connects until a connect hangs (300 ms): the stalled proxy's accept queue is full.
    /// Returns the connections that got in (close them to free the queue).
    pub fn fill_queue(&self) -> Vec<TcpStream> {
        let mut v = Vec::new();
        for _ in 0..16 {
            match TcpStream::connect_timeout(&self.addr, Duration::from_millis(300)) {
                Ok(s) => v.push(s),
                Err(_) => return v,
            }
        }
        panic!("the stalled proxy's accept queue never filled (is it stalled?)");
    }

    pub fn restore(&self) {
        let mut g = self.conns.lock().unwrap();
        self.cut.store(false, Ordering::SeqCst);
        self.stalled.store(false, Ordering::SeqCst);
        if self.blackhole.swap(false, Ordering::SeqCst) {
            for s in g.drain(..) {
                let _ = s.shutdown(Shutdown::Both);
            }
        }
    }

    pub fn endpoint(&self) -> String {
        self.addr.to_string()
    }
}

pub fn pump(mut from: TcpStream, mut to: TcpStream) {
    std::thread::spawn(move || {
        let mut buf = [0u8; 16 * 1024];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = from.shutdown(Shutdown::Both);
        let _ = to.shutdown(Shutdown::Both);
    });
}
