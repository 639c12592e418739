//! Harness for the TLS tests: a TLS `clawtermd` with a self-signed certificate, `claw-agent`
//! pods, a cuttable TCP proxy.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

pub const TENANT: u32 = 7;
pub const TOKEN: [u8; 32] = [0xAB; 32];

pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let d = std::env::temp_dir().join(format!(
            "ct-tls-{}-{tag}-{}",
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

/// A TLS server with its certificate, and agent pods. Drop order: server, agents, dir.
pub struct TlsEnv {
    pub server: Proc,
    pub agents: Vec<Proc>,
    pub addr: SocketAddr,
    /// Every stderr line of the server so far.
    pub log: Arc<Mutex<Vec<String>>>,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// SHA-256 (hex) of the server's certificate.
    pub fingerprint: String,
    pub sock: PathBuf,
    /// The QUIC address, when the server was started with QUIC.
    pub quic: Option<SocketAddr>,
    pub dir: TempDir,
}

impl TlsEnv {
    /// `agents`: (agent id, claw-agent mode arguments). `rust_log`: the server's RUST_LOG.
    pub fn start(agents: &[(u32, &[&str])], shards: u32, rust_log: &str) -> TlsEnv {
        TlsEnv::start_with(agents, shards, rust_log, &["--no-quic"])
    }

    /// Like [`TlsEnv::start`], with QUIC on an ephemeral UDP port.
    pub fn start_quic(agents: &[(u32, &[&str])], shards: u32, rust_log: &str) -> TlsEnv {
        TlsEnv::start_with(agents, shards, rust_log, &["--quic-port", "0"])
    }

    pub fn start_with(
        agents: &[(u32, &[&str])],
        shards: u32,
        rust_log: &str,
        extra: &[&str],
    ) -> TlsEnv {
        let dir = TempDir::new("env");
        let sock = dir.0.join("sock");
        std::fs::create_dir_all(&sock).unwrap();
        let certdir = dir.0.join("cert");
        std::fs::create_dir_all(&certdir).unwrap();
        let (cert, key, fingerprint) = clawterm::server::tls::self_signed(&certdir).unwrap();
        let tokens = dir.0.join("tokens");
        std::fs::write(&tokens, format!("{TENANT} {}\n", hex(&TOKEN))).unwrap();
        let agents: Vec<Proc> = agents
            .iter()
            .map(|(id, mode)| start_agent(&sock, *id, mode))
            .collect();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_clawtermd"));
        cmd.args(["--bind", "127.0.0.1", "--port", "0"])
            .arg("--tls-cert")
            .arg(&cert)
            .arg("--tls-key")
            .arg(&key)
            .arg("--tokens")
            .arg(&tokens)
            .arg("--socket-dir")
            .arg(&sock)
            .args(["--shards", &shards.to_string()])
            .args(extra)
            .args(if extra.contains(&"--admin") {
                &[][..]
            } else {
                &["--admin", "off"][..]
            })
            .env("RUST_LOG", rust_log)
            .env("NO_COLOR", "1")
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
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        let log2 = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(i) = line.find("listening on tcp ") {
                    let a = line[i + 17..]
                        .split_whitespace()
                        .next()
                        .unwrap_or("")
                        .to_string();
                    let quic = line.find(" and quic ").map(|j| {
                        line[j + 10..]
                            .split_whitespace()
                            .next()
                            .unwrap_or("")
                            .to_string()
                    });
                    let _ = tx.send((a, line.contains("(TLS 1.3)"), quic));
                }
                log2.lock().unwrap().push(line);
            }
        });
        let server = Proc(child);
        let (addr, tls, quic) = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("clawtermd did not report its address");
        assert!(tls, "the server did not say it serves TLS 1.3");
        TlsEnv {
            server,
            agents,
            addr: addr.parse().unwrap(),
            log,
            cert,
            key,
            fingerprint,
            sock,
            quic: quic.map(|q| q.trim_end_matches(',').parse().expect("QUIC address")),
            dir,
        }
    }

    pub fn endpoint(&self) -> String {
        self.addr.to_string()
    }

    /// The admin endpoint's address, from the server's log (started with `--admin`).
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.log.lock().unwrap().iter().find_map(|l| {
            let i = l.find("admin endpoint on http://")?;
            l[i + 25..].split_whitespace().next()?.parse().ok()
        })
    }

    /// `/metrics` from the admin endpoint: (name with labels, value) per sample line.
    pub fn metrics(&self) -> Vec<(String, f64)> {
        let addr = self.admin_addr().expect("started with --admin");
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
        let mut body = String::new();
        s.read_to_string(&mut body).unwrap();
        body.lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let (k, v) = l.rsplit_once(' ')?;
                Some((k.to_string(), v.parse().ok()?))
            })
            .collect()
    }

    /// Sum of the samples of metric `name` (all label sets).
    pub fn metric_sum(&self, name: &str) -> f64 {
        self.metrics()
            .iter()
            .filter(|(k, _)| k == name || k.starts_with(&format!("{name}{{")))
            .map(|(_, v)| v)
            .sum()
    }

    pub fn log_contains(&self, s: &str) -> bool {
        self.log.lock().unwrap().iter().any(|l| l.contains(s))
    }

    pub fn count_in_log(&self, s: &str) -> usize {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(s))
            .count()
    }

    /// Waits (bounded) for a server log line containing `s`.
    pub fn wait_log(&self, s: &str, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if self.log_contains(s) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    pub fn server_alive(&mut self) -> bool {
        matches!(self.server.0.try_wait(), Ok(None))
    }
}

/// Starts `claw-agent` and waits (bounded) for its "listening" line on stdout.
pub fn start_agent(sock: &Path, agent: u32, mode: &[&str]) -> Proc {
    let mut child = Command::new(env!("CARGO_BIN_EXE_claw-agent"))
        .arg("-s")
        .arg(sock)
        .args([
            "--tenant",
            &TENANT.to_string(),
            "--agent",
            &agent.to_string(),
        ])
        .args(mode)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn claw-agent");
    let out = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if line.contains("listening") {
                let _ = tx.send(());
            }
        }
    });
    let p = Proc(child);
    rx.recv_timeout(Duration::from_secs(10))
        .expect("claw-agent never printed its listening line");
    p
}

/// A TCP proxy that can be cut (every connection reset; new ones accepted and closed at once)
/// and restored.
pub struct Proxy {
    pub addr: SocketAddr,
    cut: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
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

fn pump(mut from: TcpStream, mut to: TcpStream) {
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

pub fn contains(h: &[u8], n: &[u8]) -> bool {
    h.windows(n.len()).any(|w| w == n)
}

pub fn count(h: &[u8], n: &[u8]) -> usize {
    h.windows(n.len()).filter(|w| *w == n).count()
}
