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

/// A TCP proxy that can be cut (every connection reset; new ones accepted and closed at once)
/// and restored.
pub struct Proxy {
    pub addr: SocketAddr,
    pub cut: Arc<AtomicBool>,
    pub conns: Arc<Mutex<Vec<TcpStream>>>,
}

impl Proxy {
    pub fn start(target: SocketAddr) -> Proxy {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let cut = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::new(Mutex::new(Vec::new()));
        let (c2, n2) = (cut.clone(), conns.clone());
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(client) = s else { continue };
                let mut g = n2.lock().unwrap();
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
            }
        });
        Proxy { addr, cut, conns }
    }

    pub fn cut(&self) {
        let mut g = self.conns.lock().unwrap();
        self.cut.store(true, Ordering::SeqCst);
        for s in g.drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    pub fn restore(&self) {
        let _g = self.conns.lock().unwrap();
        self.cut.store(false, Ordering::SeqCst);
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
