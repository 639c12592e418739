//! The reconnect figure for docs/CLIENT.md: from the network coming back to the first replayed
//! byte on the screen, with the real `clawterm` CLI running in a terminal.
//!
//! Setup (all release binaries, loopback): `clawtermd` (plaintext, a tokens file), a
//! `claw-agent exec` pod printing a line of `#` every 10 ms, and `clawterm connect` in a PTY
//! that this tool reads (the "screen"), connected through a TCP proxy this tool controls.
//! Each try: wait for output on the screen; cut the proxy for the outage; restore it; time
//! until the first `#` reaches the screen (clawterm's own status line never contains `#`).
//! Also timed: restore → the client's first connection reaching the proxy (the backoff wait).
//!
//! The outage: open connections are reset and new ones are accepted and closed at once (the
//! server's host answers, nothing gets through), so every attempt fails at once and the wait
//! after the network is back is the client's backoff delay.
//!
//! ```text
//! cargo build --release --bins --example reconnect_figure
//! ./target/release/examples/reconnect_figure [--tries 20] [--outage-ms 2000]
//! ```
//!
//! Linux only (PTYs via the agent SDK's helpers).

use std::io::Read;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use clawterm::agent::pty;

const TENANT: u32 = 7;
const AGENT: u32 = 1;
const TOKEN_HEX: &str = "abababababababababababababababababababababababababababababababab";

fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // target/release/examples/reconnect_figure -> target/release
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("the example lives in target/PROFILE/examples")
        .to_path_buf();
    let p = dir.join(name);
    if !p.exists() {
        eprintln!(
            "{} not found: run `cargo build --release --bins` first",
            p.display()
        );
        std::process::exit(2);
    }
    p
}

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        // SAFETY: kill(2) of our own child; no memory involved.
        unsafe { libc::kill(self.0.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

// ---------------------------------------------------------------------------------------------
// The proxy

struct Proxy {
    addr: SocketAddr,
    /// Cut: new connections are closed at once.
    cut: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
    /// When the first connection after the last restore was accepted.
    first_accept: Arc<Mutex<Option<Instant>>>,
    armed: Arc<AtomicBool>,
}

fn pump(mut from: TcpStream, mut to: TcpStream) {
    std::thread::spawn(move || {
        use std::io::Write;
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

impl Proxy {
    fn start(target: SocketAddr) -> Proxy {
        let l = TcpListener::bind("127.0.0.1:0").expect("proxy listener");
        l.set_nonblocking(true).expect("non-blocking listener");
        let addr = l.local_addr().expect("proxy address");
        let p = Proxy {
            addr,
            cut: Arc::new(AtomicBool::new(false)),
            conns: Arc::new(Mutex::new(Vec::new())),
            first_accept: Arc::new(Mutex::new(None)),
            armed: Arc::new(AtomicBool::new(false)),
        };
        let (cut, conns, first, armed) = (
            p.cut.clone(),
            p.conns.clone(),
            p.first_accept.clone(),
            p.armed.clone(),
        );
        std::thread::spawn(move || loop {
            let client = match l.accept() {
                Ok((c, _)) => c,
                Err(_) => {
                    std::thread::sleep(Duration::from_micros(200));
                    continue;
                }
            };
            let now = Instant::now();
            let _ = client.set_nonblocking(false);
            let mut g = conns.lock().unwrap_or_else(|e| e.into_inner());
            if cut.load(Ordering::SeqCst) {
                let _ = client.shutdown(Shutdown::Both);
                continue;
            }
            if armed.swap(false, Ordering::SeqCst) {
                *first.lock().unwrap_or_else(|e| e.into_inner()) = Some(now);
            }
            let Ok(server) = TcpStream::connect(target) else {
                continue;
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            if let (Ok(c), Ok(s)) = (client.try_clone(), server.try_clone()) {
                g.push(c);
                g.push(s);
            }
            drop(g);
            if let (Ok(c), Ok(s)) = (client.try_clone(), server.try_clone()) {
                pump(c, s);
                pump(server, client);
            }
        });
        p
    }

    fn reset_all(&self) {
        for s in self
            .conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    /// Starts an outage.
    fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        self.reset_all();
    }

    fn restore(&self) {
        *self.first_accept.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.armed.store(true, Ordering::SeqCst);
        self.cut.store(false, Ordering::SeqCst);
    }

    fn first_accept(&self) -> Option<Instant> {
        *self.first_accept.lock().unwrap_or_else(|e| e.into_inner())
    }
}

// ---------------------------------------------------------------------------------------------

fn arg<T: std::str::FromStr>(args: &[String], name: &str, default: T) -> T {
    match args.iter().position(|a| a == name) {
        Some(i) => match args.get(i + 1).and_then(|v| v.parse().ok()) {
            Some(v) => v,
            None => {
                eprintln!("{name} needs a value");
                std::process::exit(2);
            }
        },
        None => default,
    }
}

fn median(sorted: &[Duration]) -> Duration {
    let n = sorted.len();
    if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2
    }
}

/// Nearest-rank percentile of a sorted sample.
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 * p).ceil() as usize).saturating_sub(1);
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let tries: usize = arg(&args, "--tries", 20);
    let outage = Duration::from_millis(arg(&args, "--outage-ms", 2000));
    if tries == 0 {
        eprintln!("--tries must be at least 1");
        std::process::exit(2);
    }

    let dir = std::env::temp_dir().join(format!("ct-reconnect-figure-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let sock = dir.join("sock");
    std::fs::create_dir_all(&sock).expect("create the socket directory");
    let tokens = dir.join("tokens");
    std::fs::write(&tokens, format!("{TENANT} {TOKEN_HEX}\n")).expect("write tokens");

    let _agent = Proc(
        Command::new(bin("claw-agent"))
            .arg("-s")
            .arg(&sock)
            .args([
                "--tenant",
                &TENANT.to_string(),
                "--agent",
                &AGENT.to_string(),
            ])
            .args(["exec", "--", "sh", "-c"])
            .arg("while :; do echo '################'; sleep 0.01; done")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start claw-agent"),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.join(format!("{TENANT}_{AGENT}")).exists() {
        assert!(Instant::now() < deadline, "claw-agent never listened");
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut server = Command::new(bin("clawtermd"))
        .args(["--bind", "127.0.0.1", "--port", "0", "--insecure-plaintext"])
        .arg("--tokens")
        .arg(&tokens)
        .arg("--socket-dir")
        .arg(&sock)
        .args(["--shards", "2", "--admin", "off", "--no-quic"])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start clawtermd");
    let stderr = server.stderr.take().expect("clawtermd stderr");
    let _server = Proc(server);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr).lines() {
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
    let server_addr: SocketAddr = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("clawtermd did not report its address")
        .parse()
        .expect("clawtermd's address");
    let proxy = Proxy::start(server_addr);

    // clawterm in a PTY; a thread reads the screen and timestamps what arrives.
    let mut cmd = Command::new(bin("clawterm"));
    cmd.args(["connect", &proxy.addr.to_string()])
        .args([
            "--tenant",
            &TENANT.to_string(),
            "--agent",
            &AGENT.to_string(),
        ])
        .args(["--token", TOKEN_HEX, "--plaintext", "--name", "figure"])
        .env("CLAWTERM_STATE_DIR", dir.join("state"))
        .env("TERM", "xterm-256color");
    let (master, child) = pty::spawn(cmd, 100, 30).expect("start clawterm in a PTY");
    let _client = Proc(child);
    let (screen_tx, screen) = mpsc::channel::<(Instant, Vec<u8>)>();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match master.file().read(&mut buf) {
                Ok(0) | Err(_) => return, // EIO: clawterm exited
                Ok(n) => {
                    if screen_tx.send((Instant::now(), buf[..n].to_vec())).is_err() {
                        return;
                    }
                }
            }
        }
    });
    let has_hash = |b: &[u8]| b.contains(&b'#');
    // Waits for agent output on the screen arriving at or after `since`.
    let first_output = |since: Instant, within: Duration| -> Option<Instant> {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match screen.recv_timeout(left) {
                Ok((t, b)) if t >= since && has_hash(&b) => return Some(t),
                Ok(_) => {}
                Err(_) => return None,
            }
        }
    };
    if first_output(Instant::now(), Duration::from_secs(10)).is_none() {
        eprintln!("no agent output on the screen within 10 s");
        std::process::exit(1);
    }

    println!(
        "reconnect figure: {tries} tries, outage {} ms, clawterm default options",
        outage.as_millis()
    );
    let (mut total, mut backoff_wait) = (Vec::new(), Vec::new());
    for i in 0..tries {
        std::thread::sleep(Duration::from_millis(300));
        proxy.cut();
        let cut_at = Instant::now();
        std::thread::sleep(outage);
        // Nothing from the agent may reach the screen during the outage.
        let mut leaked = 0;
        while let Ok((t, b)) = screen.try_recv() {
            if t > cut_at + Duration::from_millis(50) && has_hash(&b) {
                leaked += 1;
            }
        }
        proxy.restore();
        let restored = Instant::now();
        let Some(first) = first_output(restored, Duration::from_secs(60)) else {
            eprintln!("try {}: no output within 60 s of the restore", i + 1);
            std::process::exit(1);
        };
        let t = first - restored;
        let w = proxy
            .first_accept()
            .map(|a| a.saturating_duration_since(restored));
        println!(
            "try {:2}: network back -> first replayed byte on screen {:>10}   (-> client's connection reaches the proxy {}){}",
            i + 1,
            ms(t),
            w.map(ms).unwrap_or_else(|| "?".into()),
            if leaked > 0 {
                format!("  [{leaked} chunks of output during the outage?]")
            } else {
                String::new()
            }
        );
        total.push(t);
        if let Some(w) = w {
            backoff_wait.push(w);
        }
    }
    total.sort();
    backoff_wait.sort();
    println!(
        "network back -> first replayed byte on screen: median {}, p90 {}, max {} (min {})",
        ms(median(&total)),
        ms(percentile(&total, 0.9)),
        ms(total[total.len() - 1]),
        ms(total[0])
    );
    if !backoff_wait.is_empty() {
        println!(
            "network back -> client's connection reaches the proxy: median {}, p90 {}, max {}",
            ms(median(&backoff_wait)),
            ms(percentile(&backoff_wait, 0.9)),
            ms(backoff_wait[backoff_wait.len() - 1])
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
