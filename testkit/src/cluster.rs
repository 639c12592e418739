//! A ClawRoam cluster for tests and figures: a real `redis-server` on a free port and
//! `clawtermd` nodes on 127.0.0.N, each with its own socket dir and echo agent.

use super::{bin, clear_clawterm_env, start_agent, start_server, Lines, Proc, TempDir};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A free TCP port on `ip` (bound and released: good enough for a test on loopback).
pub fn free_port(ip: Ipv4Addr) -> u16 {
    TcpListener::bind((ip, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("no free port on {ip}: {e}"))
}

/// A `redis-server` of its own (no persistence) on 127.0.0.1 and a free port; killed on drop.
pub struct Redis {
    pub port: u16,
    ip: Ipv4Addr,
    child: Option<Child>,
}

impl Redis {
    /// Starts one; panics (naming the package to install) if `redis-server` is missing.
    pub fn start() -> Redis {
        Redis::start_on(Ipv4Addr::LOCALHOST)
    }

    /// One listening on `ip`.
    pub fn start_on(ip: Ipv4Addr) -> Redis {
        let port = free_port(ip);
        let mut r = Redis {
            port,
            ip,
            child: None,
        };
        r.restart();
        r
    }

    /// Where nodes reach it.
    pub fn url(&self) -> String {
        format!("redis://{}:{}/0", self.ip, self.port)
    }

    /// Kills it (a keeper outage).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Freezes it (SIGSTOP): connections stay open but nothing is answered — a keeper that
    /// hangs, or a network that drops its packets.
    pub fn freeze(&self) {
        if let Some(c) = &self.child {
            crate::signal(c.id(), libc::SIGSTOP);
        }
    }

    /// Lets a frozen server go on (SIGCONT).
    pub fn thaw(&self) {
        if let Some(c) = &self.child {
            crate::signal(c.id(), libc::SIGCONT);
        }
    }

    /// Starts it again on the same port (empty: no persistence).
    pub fn restart(&mut self) {
        self.kill();
        let exe = ["/usr/bin/redis-server", "/usr/local/bin/redis-server"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .expect("redis-server is not installed: apt-get install redis-server (.ci/run does)");
        let child = Command::new(exe)
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                &self.ip.to_string(),
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "no",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(mut s) = TcpStream::connect((self.ip, self.port)) {
                let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
                let mut buf = [0u8; 16];
                if s.write_all(b"PING\r\n").is_ok()
                    && s.read(&mut buf)
                        .is_ok_and(|n| buf[..n].starts_with(b"+PONG"))
                {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "redis-server did not answer PING"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.thaw();
        self.kill();
    }
}

/// One clawtermd node of a test cluster, with its agent (tenant 7, agent 1).
pub struct Node {
    pub id: String,
    pub ip: Ipv4Addr,
    pub port: u16,
    pub peer_port: u16,
    pub admin: SocketAddr,
    pub dir: TempDir,
    pub child: Child,
    pub lines: Lines,
    pub agent: Option<Proc>,
}

impl Node {
    /// Starts node `n` (1-based: 127.0.0.n, id `node{n}`) of the cluster whose keeper is at
    /// `keeper`, with `tokens` and the cluster secret file `secret`; `extra` goes to clawtermd.
    /// Its echo agent starts first (agent modes in `agent`, e.g. `["echo"]`).
    pub fn start(
        n: u8,
        keeper: &str,
        tokens: &Path,
        secret: &Path,
        agent: &[&str],
        extra: &[&str],
    ) -> Node {
        Node::start_with(n, keeper, tokens, secret, agent, extra, None)
    }

    /// Node `n` (id `node{n}`) on address `ip`; inside network namespace `netns` when given
    /// (its admin endpoint then listens on every address of the namespace, so a
    /// `clawtermctl`/loadgen run in it reaches it on 127.0.0.1 — see [`Node::admin_local`]).
    pub fn start_at(
        n: u8,
        ip: Ipv4Addr,
        netns: Option<&str>,
        keeper: &str,
        tokens: &Path,
        secret: &Path,
        agent: &[&str],
    ) -> Node {
        Node::spawn(n, ip, netns, keeper, tokens, secret, agent, &[], None)
    }

    /// [`Node::start`] serving TLS 1.3 with `tls` (certificate, key) instead of plaintext.
    pub fn start_tls(
        n: u8,
        keeper: &str,
        tokens: &Path,
        secret: &Path,
        agent: &[&str],
        tls: (&Path, &Path),
    ) -> Node {
        Node::start_with(n, keeper, tokens, secret, agent, &[], Some(tls))
    }

    fn start_with(
        n: u8,
        keeper: &str,
        tokens: &Path,
        secret: &Path,
        agent: &[&str],
        extra: &[&str],
        tls: Option<(&Path, &Path)>,
    ) -> Node {
        let ip = Ipv4Addr::new(127, 0, 0, n);
        Node::spawn(n, ip, None, keeper, tokens, secret, agent, extra, tls)
    }

    #[allow(clippy::too_many_arguments)]
    fn spawn(
        n: u8,
        ip: Ipv4Addr,
        netns: Option<&str>,
        keeper: &str,
        tokens: &Path,
        secret: &Path,
        agent: &[&str],
        extra: &[&str],
        tls: Option<(&Path, &Path)>,
    ) -> Node {
        let dir = TempDir::with_sock(&format!("node{n}"));
        // The agent listens on a Unix socket path: reachable from any network namespace.
        let agent = (!agent.is_empty()).then(|| start_agent(&dir.sock(), 7, 1, agent));
        // A namespace has ports of its own: any port free here is free there.
        let probe = if netns.is_some() {
            Ipv4Addr::LOCALHOST
        } else {
            ip
        };
        let (port, peer_port, admin_port) = (free_port(probe), free_port(probe), free_port(probe));
        let admin_ip = if netns.is_some() {
            Ipv4Addr::UNSPECIFIED
        } else {
            ip
        };
        let id = format!("node{n}");
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(bin("clawtermd"));
                c
            }
            None => Command::new(bin("clawtermd")),
        };
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        clear_clawterm_env(&mut cmd);
        cmd.args(["--bind", &ip.to_string(), "--port", &port.to_string()])
            .args(["--no-quic", "--no-ws", "--shards", "2"])
            .args(["--node-id", &id, "--keeper", keeper])
            .args(["--peer-port", &peer_port.to_string()])
            .args(["--admin", &format!("{admin_ip}:{admin_port}")])
            .arg("--tokens")
            .arg(tokens)
            .arg("--cluster-secret")
            .arg(secret)
            .arg("--socket-dir")
            .arg(dir.sock())
            .args(extra);
        match tls {
            Some((cert, key)) => {
                cmd.arg("--tls-cert").arg(cert).arg("--tls-key").arg(key);
            }
            None => {
                cmd.arg("--insecure-plaintext");
            }
        }
        cmd.env(
            "RUST_LOG",
            std::env::var("CLUSTER_LOG").unwrap_or_else(|_| "info".into()),
        );
        let (child, lines, _) = start_server(&mut cmd, &id);
        Node {
            id,
            ip,
            port,
            peer_port,
            admin: SocketAddr::new(ip.into(), admin_port),
            dir,
            child,
            lines,
            agent,
        }
    }

    /// Where clients connect.
    pub fn endpoint(&self) -> String {
        format!("{}:{}", self.ip, self.port)
    }

    /// An admin request (`GET`/`POST` and a path): the status code and the body.
    pub fn admin(&self, method: &str, path: &str) -> (u16, String) {
        admin_request(self.admin, method, path)
    }

    /// Runs `clawtermctl --admin THIS ARGS`: exit code, stdout, stderr.
    pub fn ctl(&self, args: &[&str]) -> (i32, String, String) {
        let out = Command::new(bin("clawtermctl"))
            .arg("--admin")
            .arg(self.admin.to_string())
            .args(args)
            .output()
            .expect("run clawtermctl");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// The node's stderr so far.
    pub fn log(&self) -> String {
        self.lines.lock().map(|l| l.join("\n")).unwrap_or_default()
    }

    /// Sessions this node serves, from `/v1/sessions`.
    pub fn session_count(&self) -> usize {
        let (_, body) = self.admin("GET", "/v1/sessions");
        body.matches("\"id\":").count()
    }

    /// A metric's value summed over its label sets (`name{...} V` and `name V` lines).
    pub fn metric(&self, name: &str) -> f64 {
        let (_, body) = self.admin("GET", "/metrics");
        body.lines()
            .filter(|l| {
                l.starts_with(name)
                    && matches!(l.as_bytes().get(name.len()), Some(b'{') | Some(b' '))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

impl Node {
    /// The admin endpoint as seen from inside the node's own network namespace.
    pub fn admin_local(&self) -> SocketAddr {
        SocketAddr::new(Ipv4Addr::LOCALHOST.into(), self.admin.port())
    }

    /// Freezes the node (SIGSTOP): cut off from its peers and the keeper as if its network
    /// dropped everything, without closing a connection.
    pub fn freeze(&self) {
        crate::signal(self.child.id(), libc::SIGSTOP);
    }

    /// Lets a frozen node go on (SIGCONT), with the view it had when it stopped.
    pub fn thaw(&self) {
        crate::signal(self.child.id(), libc::SIGCONT);
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.thaw();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An HTTP/1.1 request to an admin endpoint; the status code and the body.
pub fn admin_request(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(3)) else {
        return (0, String::new());
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(60)));
    let _ = write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let code = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (code, body)
}

/// A network namespace joined to this one by a veth pair: `host` here, `inside` there
/// (10.231.K.1 and .2, /24). [`Netns::cut`] takes the link down — everything in the namespace
/// is cut off from everything outside, its processes running on — and [`Netns::restore`]
/// brings it back. Removed on drop. Needs root and `ip` (iproute2).
pub struct Netns {
    pub name: String,
    pub host: Ipv4Addr,
    pub inside: Ipv4Addr,
    veth: String,
}

impl Netns {
    /// Creates it; `None` (with the reason on stderr) where namespaces cannot be made.
    pub fn create(k: u8) -> Option<Netns> {
        let name = format!("ctns{}-{k}", std::process::id());
        let veth = format!("ctv{}{k}", std::process::id() % 100_000);
        let peer = format!("{veth}p");
        let (host, inside) = (Ipv4Addr::new(10, 231, k, 1), Ipv4Addr::new(10, 231, k, 2));
        let ns = Netns {
            name: name.clone(),
            host,
            inside,
            veth: veth.clone(),
        };
        let steps: [Vec<String>; 8] = [
            vec!["netns".into(), "add".into(), name.clone()],
            vec![
                "link".into(),
                "add".into(),
                veth.clone(),
                "type".into(),
                "veth".into(),
                "peer".into(),
                "name".into(),
                peer.clone(),
            ],
            vec![
                "link".into(),
                "set".into(),
                peer.clone(),
                "netns".into(),
                name.clone(),
            ],
            vec![
                "addr".into(),
                "add".into(),
                format!("{host}/24"),
                "dev".into(),
                veth.clone(),
            ],
            vec!["link".into(), "set".into(), veth.clone(), "up".into()],
            vec![
                "-n".into(),
                name.clone(),
                "addr".into(),
                "add".into(),
                format!("{inside}/24"),
                "dev".into(),
                peer.clone(),
            ],
            vec![
                "-n".into(),
                name.clone(),
                "link".into(),
                "set".into(),
                peer.clone(),
                "up".into(),
            ],
            vec![
                "-n".into(),
                name.clone(),
                "link".into(),
                "set".into(),
                "lo".into(),
                "up".into(),
            ],
        ];
        for s in steps {
            match Command::new("ip").args(&s).output() {
                Ok(o) if o.status.success() => {}
                Ok(o) => {
                    eprintln!("ip {}: {}", s.join(" "), String::from_utf8_lossy(&o.stderr));
                    return None;
                }
                Err(e) => {
                    eprintln!("ip: {e}");
                    return None;
                }
            }
        }
        Some(ns)
    }

    /// Takes the link down: the namespace is cut off.
    pub fn cut(&self) {
        let _ = Command::new("ip")
            .args(["link", "set", &self.veth, "down"])
            .status();
    }

    /// Brings the link back.
    pub fn restore(&self) {
        let _ = Command::new("ip")
            .args(["link", "set", &self.veth, "up"])
            .status();
    }

    /// A command run inside the namespace.
    pub fn command(&self, program: &Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.veth])
            .status();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// `loadgen roam` (the binary at `loadgen`) draining `node`: its client and admin addresses and
/// the test tenant's credentials; add the rest.
pub fn roam_command(loadgen: &Path, node: &Node) -> Command {
    use crate::client::{AGENT, TENANT, TOKEN};
    let mut cmd = Command::new(loadgen);
    cmd.args(["roam", "--target", &node.endpoint()])
        .args(["--admin", &node.admin.to_string()])
        .args([
            "--tenant",
            &TENANT.to_string(),
            "--agent",
            &AGENT.to_string(),
        ])
        .args(["--token", &crate::hex(&TOKEN)]);
    cmd
}

/// Writes a cluster secret file in `dir` and returns its path.
pub fn secret_file(dir: &Path, secret: &str) -> PathBuf {
    let p = dir.join("cluster.secret");
    std::fs::write(&p, secret).expect("write the cluster secret");
    p
}
