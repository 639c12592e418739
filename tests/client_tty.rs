//! The `clawterm` CLI under a real terminal (tmux with a private socket): a shell session,
//! then an outage in the middle of output: the status line appears, and after the network comes
//! back every line arrives exactly once (checked through `--log`) and the status line goes away.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

const TENANT: u32 = 7;
const AGENT: u32 = 1;
const TOKEN: [u8; 32] = [0xAB; 32];

// ---------------------------------------------------------------------------------------------
// Harness

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
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
struct Proc(Child);

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

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Server + one agent. Drop order: server, agents, dir.
#[allow(dead_code)] // held for their Drop
struct Env {
    server: Proc,
    agents: Vec<Proc>,
    addr: SocketAddr,
    dir: TempDir,
}

impl Env {
    /// `mode`: claw-agent arguments after the ids (e.g. `["echo"]`).
    fn start(mode: &[&str]) -> Env {
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

    fn endpoint(&self) -> String {
        self.addr.to_string()
    }
}

fn start_agent(sock: &Path, agent: u32, mode: &[&str]) -> Proc {
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
struct Proxy {
    addr: SocketAddr,
    cut: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
}

impl Proxy {
    fn start(target: SocketAddr) -> Proxy {
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

    fn cut(&self) {
        let mut g = self.conns.lock().unwrap();
        self.cut.store(true, Ordering::SeqCst);
        for s in g.drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    fn restore(&self) {
        let _g = self.conns.lock().unwrap();
        self.cut.store(false, Ordering::SeqCst);
    }

    fn endpoint(&self) -> String {
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

// ---------------------------------------------------------------------------------------------
// tmux

struct Tmux {
    socket: String,
}

impl Tmux {
    fn new() -> Tmux {
        static N: AtomicU32 = AtomicU32::new(0);
        Tmux {
            socket: format!(
                "test-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::SeqCst)
            ),
        }
    }

    fn run(&self, args: &[&str]) -> String {
        let out = Command::new("tmux")
            .args(["-L", &self.socket, "-f", "/dev/null"])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run tmux");
        assert!(
            out.status.success(),
            "tmux {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn capture(&self) -> String {
        self.run(&["capture-pane", "-p", "-t", "ct"])
    }

    /// Waits until the pane satisfies `f`.
    fn wait_for(&self, what: &str, within: Duration, f: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + within;
        loop {
            let s = self.capture();
            if f(&s) {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "pane never showed {what}; pane:\n{s}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["-L", &self.socket, "kill-server"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

fn tmux_available() -> bool {
    Command::new("tmux")
        .arg("-V")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Starts `clawterm connect` in a fresh tmux session (100x30) named `ct`; the pane stays open
/// after it exits, showing `EXIT=<status>`.
fn start_client(t: &Tmux, endpoint: &str, agent: u32, state: &Path, log: &Path) {
    let cmd = format!(
        "env CLAWTERM_STATE_DIR={} {} connect {endpoint} --tenant {TENANT} --agent {agent} --token {} --plaintext --name tty --log {}; echo EXIT=$?; sleep 60",
        sh_quote(&state.display().to_string()),
        sh_quote(env!("CARGO_BIN_EXE_clawterm")),
        hex(&TOKEN),
        sh_quote(&log.display().to_string()),
    );
    t.run(&[
        "new-session",
        "-d",
        "-s",
        "ct",
        "-x",
        "100",
        "-y",
        "30",
        &cmd,
    ]);
}

#[test]
fn tty_session_survives_outage() {
    if !tmux_available() {
        panic!("tmux is required for this test (apt-get install tmux)");
    }
    // Agent 1: a shell in a PTY. Agent 2: prints L1..L300 slowly once it reads a line.
    let mut env = Env::start(&["shell", "--shell", "/bin/sh"]);
    let sock = env.dir.0.join("sock");
    env.agents.push(start_agent(
        &sock,
        2,
        &[
            "exec",
            "--",
            "sh",
            "-c",
            "read x; for i in $(seq 1 300); do echo L$i; sleep 0.01; done; sleep 60",
        ],
    ));
    let state = env.dir.0.join("state");

    // 1. Interactive shell: a command's output shows in the pane.
    {
        let t = Tmux::new();
        let log = env.dir.0.join("shell.log");
        start_client(&t, &env.endpoint(), AGENT, &state, &log);
        t.wait_for("the banner", Duration::from_secs(10), |s| {
            s.contains("session tty")
        });
        t.run(&["send-keys", "-t", "ct", "echo out-$((6*7))", "Enter"]);
        t.wait_for("the command's output", Duration::from_secs(10), |s| {
            s.contains("out-42")
        });
        // Detach on purpose: Enter ~. ; the client exits 0 and the session stays saved.
        t.run(&["send-keys", "-t", "ct", "Enter", "~."]);
        let s = t.wait_for("the detach", Duration::from_secs(10), |s| {
            s.contains("EXIT=")
        });
        assert!(s.contains("EXIT=0") && s.contains("detached"), "{s}");
        assert!(state.join("sessions/tty.json").exists());
        let _ = std::fs::remove_file(state.join("sessions/tty.json"));
    }

    // 2. An outage in the middle of output.
    let proxy = Proxy::start(env.addr);
    let t = Tmux::new();
    let log = env.dir.0.join("seq.log");
    start_client(&t, &proxy.endpoint(), 2, &state, &log);
    t.wait_for("the banner", Duration::from_secs(10), |s| {
        s.contains("session tty")
    });
    t.run(&["send-keys", "-t", "ct", "C-j"]);
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !read_log().contains("L20\n") {
        assert!(
            Instant::now() < deadline,
            "output never started: {:?}",
            read_log()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    proxy.cut();
    let s = t.wait_for("the status line", Duration::from_secs(10), |s| {
        s.contains("connection lost")
    });
    assert!(
        s.contains("retrying in") || s.contains("reconnecting"),
        "{s}"
    );
    let during = read_log();
    std::thread::sleep(Duration::from_millis(1000));
    assert!(
        !read_log().contains("L300\n"),
        "output finished during the outage (no outage?)"
    );
    proxy.restore();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !read_log().contains("L300\n") {
        assert!(
            Instant::now() < deadline,
            "output never completed after restore; log: {:?}",
            read_log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    let want: String = (1..=300).map(|i| format!("L{i}\n")).collect();
    let got = read_log();
    assert!(got.len() > during.len(), "nothing replayed");
    assert_eq!(got, want, "every line exactly once, in order");
    t.wait_for("the status line to go away", Duration::from_secs(5), |s| {
        !s.contains("connection lost")
    });
    // End the session on purpose: Enter ~X (sent as C-j so the agent's `read` is not involved).
    t.run(&["send-keys", "-t", "ct", "C-j", "~X"]);
    let s = t.wait_for("the end", Duration::from_secs(10), |s| s.contains("EXIT="));
    assert!(s.contains("EXIT=0"), "{s}");
    assert!(
        !state.join("sessions/tty.json").exists(),
        "ended session still saved"
    );
}
