//! Harness for the TLS tests: a TLS `clawtermd` with a self-signed certificate, `claw-agent`
//! pods, a cuttable TCP proxy.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

// Not every test binary uses every re-export.
use crate::{clawtermd, quic_addr, start_server, tcp_addr, word_after};
#[allow(unused_imports)]
pub use crate::{contains, count, hex, Lines, Proc, Proxy, TempDir};

pub const TENANT: u32 = 7;
pub const TOKEN: [u8; 32] = [0xAB; 32];

/// A TLS server with its certificate, and agent pods. Drop order: server, agents, dir.
pub struct TlsEnv {
    pub server: Proc,
    pub agents: Vec<Proc>,
    pub addr: SocketAddr,
    /// Every stderr line of the server so far.
    pub log: Lines,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// SHA-256 (hex) of the server's certificate.
    pub fingerprint: String,
    pub sock: PathBuf,
    /// The QUIC address, when the server was started with QUIC.
    pub quic: Option<SocketAddr>,
    /// The WebSocket address (wss), unless started with `--no-ws`.
    pub ws: Option<SocketAddr>,
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
        let dir = TempDir::with_sock("env");
        let sock = dir.sock();
        let certdir = dir.0.join("cert");
        std::fs::create_dir_all(&certdir).unwrap();
        let (cert, key, fingerprint) = clawterm::server::tls::self_signed(&certdir).unwrap();
        let tokens = dir.0.join("tokens");
        std::fs::write(&tokens, format!("{TENANT} {}\n", hex(&TOKEN))).unwrap();
        let agents: Vec<Proc> = agents
            .iter()
            .map(|(id, mode)| start_agent(&sock, *id, mode))
            .collect();
        let mut cmd = clawtermd();
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
            .env("NO_COLOR", "1");
        let (child, log, line) = start_server(&mut cmd, "clawtermd");
        let server = Proc(child);
        assert!(
            line.contains("(TLS 1.3)"),
            "the server did not say it serves TLS 1.3"
        );
        TlsEnv {
            server,
            agents,
            addr: tcp_addr(&line).expect("clawtermd's TCP address"),
            log,
            cert,
            key,
            fingerprint,
            sock,
            quic: line
                .contains(" and quic ")
                .then(|| quic_addr(&line).expect("QUIC address")),
            ws: crate::ws_addr(&line),
            dir,
        }
    }

    pub fn endpoint(&self) -> String {
        self.addr.to_string()
    }

    /// The admin endpoint's address, from the server's log (started with `--admin`).
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .find_map(|l| word_after(l, "admin endpoint on http://")?.parse().ok())
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

/// Starts `claw-agent` for TENANT and waits (bounded) until it is listening.
pub fn start_agent(sock: &Path, agent: u32, mode: &[&str]) -> Proc {
    crate::start_agent(sock, TENANT, agent, mode)
}
