//! Two pod-link figures, measured against real `clawtermd` and `claw-agent` processes:
//!
//! 1. links: 10,000 sessions spread over 4 `claw-agent echo` pods through a 2-shard
//!    `clawtermd`; counts the unix-socket links (goal: at most shards × pods = 8), from the
//!    exactly: connected AF_UNIX socket pairs (`ss -xaH`: local and peer inode) with one end
//!    in a pod's `/proc/PID/fd` and the other in the daemon's.
//! 2. discovery latency: time from a pod's socket file appearing to the first accepted CONNECT
//!    to it (the daemon already running; a fresh agent id each try), median of 20.
//!
//! ```text
//! cargo build --release -p clawterm --bins && cargo run --release -p clawterm-bench --bin pod_figures
//! ```
//!
//! Uses the release `clawtermd` and `claw-agent` next to this program
//! (`target/release/`). Linux only (reads /proc).

use clawterm_client::core::{ClientCore, CoreEvent, CoreOptions};
use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use clawterm_testkit as harness;

use harness::{agent_command, bin, clawtermd, raise_nofile, tcp_addr, Proc};

const TENANT: u32 = 7;
const SESSIONS: usize = 10_000;
const PODS: u32 = 4;
const SHARDS: usize = 2;
const TRIES: u32 = 20;

fn start_server(sock: &Path) -> (Proc, SocketAddr) {
    let mut cmd = clawtermd();
    cmd.args(["--bind", "127.0.0.1", "--port", "0"])
        .args(["--insecure-plaintext", "--insecure-no-auth"])
        .arg("--socket-dir")
        .arg(sock)
        .args(["--shards", &SHARDS.to_string(), "--io", "uring"])
        .args(["--admin", "off", "--no-quic", "--agent-grace", "5"])
        .env("RUST_LOG", "warn,clawtermd=info");
    let (child, _, line) = harness::start_server(&mut cmd, "clawtermd");
    (Proc(child), tcp_addr(&line).expect("clawtermd's address"))
}

/// `claw-agent ... echo`, not waited for (the figures watch for its socket).
fn start_agent(sock: &Path, agent: u32) -> Proc {
    let child = agent_command(sock, TENANT, agent, &["echo"])
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn claw-agent");
    Proc(child)
}

/// A TCP connection from `src` (port chosen by the kernel) to `dst`.
fn connect_from(src: Ipv4Addr, dst: SocketAddr) -> TcpStream {
    harness::connect_from(src, dst).unwrap_or_else(|e| panic!("connect from {src} to {dst}: {e}"))
}

/// Sends CONNECT to `agent` (through the client core, which then reads the answer).
fn send_connect(s: &mut TcpStream, agent: u32) -> ClientCore {
    let mut core = ClientCore::new(TENANT, agent, [0x11; 32]);
    core.set_options(CoreOptions {
        offer_reliable: false,
        ..CoreOptions::default()
    });
    core.start_connect([0x42; 16], 0);
    s.write_all(&core.take_output()).unwrap();
    core
}

/// The handshake's outcome (bounded by the stream's read timeout): ACCEPT or ERROR.
fn answer(s: &mut TcpStream, core: &mut ClientCore) -> Option<CoreEvent> {
    let mut chunk = [0u8; 256];
    loop {
        if let Some(e) = core.poll_event() {
            return Some(e);
        }
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return None,
            Ok(n) => core.on_bytes(&chunk[..n], 0).ok()?,
        }
    }
}

/// Socket inodes of a process's fds.
fn socket_inodes(pid: u32) -> HashSet<u64> {
    let mut set = HashSet::new();
    if let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
        for e in rd.flatten() {
            if let Ok(t) = std::fs::read_link(e.path()) {
                let t = t.to_string_lossy().into_owned();
                if let Some(n) = t.strip_prefix("socket:[").and_then(|r| r.strip_suffix(']')) {
                    if let Ok(n) = n.parse() {
                        set.insert(n);
                    }
                }
            }
        }
    }
    set
}

/// Connected AF_UNIX stream sockets from `ss -xaH`: (local inode, peer inode).
fn unix_pairs() -> Vec<(u64, u64)> {
    let out = Command::new("ss")
        .args(["-xaH"])
        .output()
        .expect("run ss (iproute2)");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut v = Vec::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        // Netid State Recv-Q Send-Q Local Port Peer Port
        if f.len() >= 8 && f[0] == "u_str" && f[1] == "ESTAB" {
            if let (Ok(l), Ok(p)) = (f[5].parse(), f[7].parse()) {
                v.push((l, p));
            }
        }
    }
    v
}

/// Links between a pod process and the daemon: connected socket pairs with one end in each.
fn links_between(pod: u32, daemon: u32, pairs: &[(u64, u64)]) -> usize {
    let (p, d) = (socket_inodes(pod), socket_inodes(daemon));
    pairs
        .iter()
        .filter(|(l, peer)| p.contains(l) && d.contains(peer))
        .count()
}

fn figure_links(dir: &Path) {
    println!("== links: {SESSIONS} sessions over {PODS} pods, {SHARDS} shards ==");
    let sock = dir.join("links");
    std::fs::create_dir_all(&sock).unwrap();
    let agents: Vec<Proc> = (1..=PODS).map(|a| start_agent(&sock, a)).collect();
    for a in 1..=PODS {
        let p = sock.join(format!("{TENANT}_{a}"));
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::os::unix::net::UnixStream::connect(&p).is_err() {
            assert!(Instant::now() < deadline, "agent {a} never listened");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    let (server, addr) = start_server(&sock);
    let t0 = Instant::now();
    let mut conns = Vec::with_capacity(SESSIONS);
    let mut accepted = 0;
    for batch in (0..SESSIONS).collect::<Vec<_>>().chunks(500) {
        let mut open = Vec::new();
        for &i in batch {
            let src = Ipv4Addr::new(127, 0, 0, 2 + (i % 8) as u8);
            let mut s = connect_from(src, addr);
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let core = send_connect(&mut s, 1 + (i as u32 % PODS));
            open.push((s, core));
        }
        for (mut s, mut core) in open {
            match answer(&mut s, &mut core) {
                Some(CoreEvent::Accepted { .. }) => accepted += 1,
                other => panic!("CONNECT answered with {other:?}"),
            }
            conns.push(s);
        }
    }
    let took = t0.elapsed();
    println!("{accepted} sessions accepted in {took:.2?} (sources 127.0.0.2-127.0.0.9)");
    std::thread::sleep(Duration::from_millis(200));
    let pairs = unix_pairs();
    let dpid = server.0.id();
    let mut total = 0;
    for (i, a) in agents.iter().enumerate() {
        let n = links_between(a.0.id(), dpid, &pairs);
        total += n;
        println!("pod {TENANT}_{}: {n} links from clawtermd", i + 1);
    }
    let daemon_unix = socket_inodes(dpid)
        .iter()
        .filter(|i| pairs.iter().any(|(l, _)| l == *i))
        .count();
    println!(
        "total links: {total} (goal <= shards x pods = {}); clawtermd holds {daemon_unix} connected unix sockets in all",
        SHARDS * PODS as usize
    );
    drop(conns);
    drop(server);
    drop(agents);
}

fn figure_discovery(dir: &Path) {
    println!("== discovery: socket file created -> first ACCEPT, {TRIES} tries ==");
    let sock = dir.join("disc");
    std::fs::create_dir_all(&sock).unwrap();
    let (_server, addr) = start_server(&sock);
    let mut times = Vec::new();
    let mut refusals_total = 0;
    for t in 0..TRIES {
        let agent = 100 + t;
        let path = sock.join(format!("{TENANT}_{agent}"));
        let a = start_agent(&sock, agent);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !path.exists() {
            assert!(Instant::now() < deadline, "socket never appeared");
            std::hint::spin_loop();
        }
        let appeared = Instant::now();
        let mut refusals = 0;
        let took = loop {
            let mut s = TcpStream::connect(addr).unwrap();
            s.set_nodelay(true).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut core = send_connect(&mut s, agent);
            match answer(&mut s, &mut core) {
                Some(CoreEvent::Accepted { .. }) => break appeared.elapsed(),
                Some(CoreEvent::Error { code: 5, .. }) => refusals += 1,
                other => panic!("CONNECT answered with {other:?}"),
            }
            assert!(
                appeared.elapsed() < Duration::from_secs(5),
                "no ACCEPT in 5 s"
            );
        };
        refusals_total += refusals;
        println!(
            "try {:2}: {:8.3} ms ({refusals} NO_AGENT first)",
            t + 1,
            took.as_secs_f64() * 1e3
        );
        times.push(took);
        drop(a);
    }
    times.sort();
    let med = (times[TRIES as usize / 2 - 1] + times[TRIES as usize / 2]) / 2;
    println!(
        "median {:.3} ms, min {:.3} ms, max {:.3} ms ({refusals_total} NO_AGENT refusals in all)",
        med.as_secs_f64() * 1e3,
        times[0].as_secs_f64() * 1e3,
        times[times.len() - 1].as_secs_f64() * 1e3
    );
}

fn main() {
    let nofile = raise_nofile();
    println!(
        "RLIMIT_NOFILE {nofile}; binaries from {}",
        bin("clawtermd").parent().unwrap().display()
    );
    let dir = std::env::temp_dir().join(format!("pod-figures-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    figure_links(&dir);
    figure_discovery(&dir);
    let _ = std::fs::remove_dir_all(&dir);
}
