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
//! cargo build --release -p clawterm --bins && cargo build --release -p clawterm-bench --bin reconnect_figure
//! ./target/release/reconnect_figure [--tries 20] [--outage-ms 2000]
//! ```
//!
//! Linux only (PTYs via the agent SDK's helpers).

use std::io::Read;
use std::net::SocketAddr;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use clawterm_agent::pty::PtyCommand;

use clawterm_testkit as harness;

use harness::{bin, plaintext_clawtermd, start_agent, start_server, tcp_addr, Proc, Proxy};

/// The terminal client started in a PTY: stopped (SIGKILL, then reaped) when the figure ends.
struct PtyClient(libc::pid_t);

impl Drop for PtyClient {
    fn drop(&mut self) {
        harness::signal(self.0 as u32, libc::SIGKILL);
        let mut status = 0;
        // SAFETY: waits for our own child; `status` is a valid place for its status.
        unsafe { libc::waitpid(self.0, &mut status, 0) };
    }
}

const TENANT: u32 = 7;
const AGENT: u32 = 1;
const TOKEN_HEX: &str = "abababababababababababababababababababababababababababababababab";

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

    let _agent = start_agent(
        &sock,
        TENANT,
        AGENT,
        &[
            "exec",
            "--",
            "sh",
            "-c",
            "while :; do echo '################'; sleep 0.01; done",
        ],
    );
    let mut server = plaintext_clawtermd(&tokens, &sock);
    server
        .args(["--shards", "2", "--admin", "off", "--no-quic"])
        .env("RUST_LOG", "info");
    let (server, _, line) = start_server(&mut server, "clawtermd");
    let _server = Proc(server);
    let server_addr: SocketAddr = tcp_addr(&line).expect("clawtermd's address");
    let proxy = Proxy::start(server_addr);

    // clawterm in a PTY; a thread reads the screen and timestamps what arrives.
    let mut cmd = PtyCommand::new(bin("clawterm"));
    cmd.arg("connect")
        .arg(proxy.addr.to_string())
        .arg("--tenant")
        .arg(TENANT.to_string())
        .arg("--agent")
        .arg(AGENT.to_string())
        .arg("--token")
        .arg(TOKEN_HEX)
        .arg("--plaintext")
        .arg("--name")
        .arg("figure")
        .env("CLAWTERM_STATE_DIR", dir.join("state"))
        .env("TERM", "xterm-256color");
    let child = cmd.spawn(100, 30).expect("start clawterm in a PTY");
    let _client = PtyClient(child.pid);
    let master = child.master;
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
