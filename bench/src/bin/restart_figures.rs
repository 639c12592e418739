//! The figures of sessions that outlive `clawtermd` (docs/STATE.md, docs/BENCHMARKS.md):
//!
//! * **cost**: what keeping sessions in a state dir costs on the per-frame path — closed-loop
//!   echo rate with and without `--state-dir` (alternating runs, medians and their ratio) and
//!   the server's RSS per idle session with and without;
//! * **busy upgrade**: `--busy` echo sessions (loadgen, open loop, every session echoing every
//!   200 ms) while the daemon is upgraded `--upgrades` times: per upgrade the time from the new
//!   process's start to the old one's exit and the hand-over's own times (`took_ms`,
//!   `frozen_ms`); over the run the longest echo any client waited (every pause a client saw is
//!   inside it), losses, and connects refused by a prober connecting every 2 ms throughout;
//! * **idle upgrade**: the same with `--idle` idle sessions and 50 echo probes;
//! * **kill**: `--kill` sessions each with one echo pending (never read), SIGKILL, a new daemon
//!   on the state dir: its start to `listening` (every session is restored before it listens),
//!   its start to the last session RESUMEd (8 threads), and the bytes of pending output lost.
//!
//! ```text
//! cargo build --release -p clawterm -p loadgen --bins && cargo build --release -p clawterm-bench --bin restart_figures
//! ./target/release/restart_figures [--idle 10000] [--busy 2000] [--kill 10000] [--upgrades 3] [--reps 3] [--json FILE]
//! ```
//!
//! Progress on stderr, one JSON object on stdout (and in `--json FILE`). Loopback only; every
//! wait is bounded.

use clawterm::proto::{self, Decoded, FrameType};
use clawterm_testkit as harness;
use harness::{Lines, Proc};
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const TENANT: u32 = 7;
const AGENT: u32 = 1;

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

fn say(s: impl AsRef<str>) {
    eprintln!("[restart_figures] {}", s.as_ref());
}

/// A running clawtermd.
struct Daemon {
    proc: Proc,
    lines: Lines,
    addr: SocketAddr,
    /// From spawn to its "listening" line.
    started_in: Duration,
}

impl Daemon {
    fn start(sock: &Path, state: Option<&Path>, shards: usize, extra: &[&str]) -> Daemon {
        let mut cmd = harness::clawtermd();
        cmd.args(["--bind", "127.0.0.1", "--port", "0"])
            .args(["--shards", &shards.to_string(), "--io", "uring"])
            .args([
                "--insecure-plaintext",
                "--insecure-no-auth",
                "--admin",
                "off",
                "--no-quic",
            ])
            .arg("--socket-dir")
            .arg(sock)
            .arg("--state-dir")
            .arg(state.map_or_else(|| PathBuf::from("off"), Path::to_path_buf))
            .args(extra)
            .env("RUST_LOG", "info");
        let t0 = Instant::now();
        let (child, lines, line) = harness::start_server(&mut cmd, "clawtermd");
        Daemon {
            proc: Proc(child),
            lines,
            addr: harness::tcp_addr(&line).expect("listen address"),
            started_in: t0.elapsed(),
        }
    }

    fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// The first log line containing `what`.
    fn line(&self, what: &str) -> Option<String> {
        self.lines
            .lock()
            .ok()?
            .iter()
            .find(|l| l.contains(what))
            .cloned()
    }

    fn exited(&mut self) -> bool {
        !matches!(self.proc.0.try_wait(), Ok(None))
    }
}

fn num_after(line: &str, key: &str) -> Option<f64> {
    harness::word_after(line, key)?.parse().ok()
}

/// Runs loadgen to the end; its JSON result.
fn loadgen(args: &[String]) -> serde_json::Value {
    let out = loadgen_spawn(args).wait_with_output().expect("loadgen");
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "loadgen's JSON: {e}; stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn loadgen_spawn(args: &[String]) -> std::process::Child {
    let exe = std::env::current_exe().expect("own path");
    let lg = exe.with_file_name("loadgen");
    Command::new(lg)
        .args(args)
        .args([
            "--tenant",
            &TENANT.to_string(),
            "--agent",
            &AGENT.to_string(),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn loadgen (build it: cargo build --release -p loadgen)")
}

fn s(v: impl ToString) -> String {
    v.to_string()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n == 0 {
        0.0
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn stop(mut d: Daemon) {
    harness::stop(&mut d.proc.0);
}

// ---------------------------------------------------------------------------------------------

fn cost(dir: &Path, sock: &Path, reps: usize, idle: usize) -> serde_json::Value {
    let mut rates: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    for rep in 0..reps {
        for (m, with) in [false, true].into_iter().enumerate() {
            let state = dir.join(format!("cost-state-{rep}-{m}"));
            let d = Daemon::start(sock, with.then_some(state.as_path()), 1, &[]);
            let v = loadgen(&[
                s("echo"),
                s("--target"),
                s(d.addr),
                s("--sessions"),
                s(100),
                s("--rate"),
                s(0),
                s("--duration"),
                s(4),
                s("--warmup"),
                s(1),
            ]);
            let r = v["achieved_rate"].as_f64().unwrap_or(0.0);
            say(format!(
                "cost rep {rep}: closed-loop echo {} state dir: {r:.0}/s",
                if with { "with" } else { "without" }
            ));
            rates[m].push(r);
            stop(d);
        }
    }
    let mut rss = [0.0f64; 2];
    for (m, with) in [false, true].into_iter().enumerate() {
        let state = dir.join(format!("rss-state-{m}"));
        let d = Daemon::start(sock, with.then_some(state.as_path()), 1, &[]);
        let v = loadgen(&[
            s("idle"),
            s("--target"),
            s(d.addr),
            s("--sessions"),
            s(idle),
            s("--duration"),
            s(2),
            s("--server-pid"),
            s(d.pid()),
        ]);
        rss[m] = v["server_rss_bytes_per_session"].as_f64().unwrap_or(0.0);
        say(format!(
            "cost: RSS per idle session {} state dir: {} B",
            if with { "with" } else { "without" },
            rss[m]
        ));
        stop(d);
    }
    let (off, on) = (median(rates[0].clone()), median(rates[1].clone()));
    serde_json::json!({
        "echo_closed_loop_per_s": {"without_state_dir": rates[0], "with_state_dir": rates[1],
            "median_without": off, "median_with": on,
            "ratio": if off > 0.0 { on / off } else { 0.0 }},
        "rss_per_idle_session_bytes": {"without_state_dir": rss[0], "with_state_dir": rss[1],
            "difference": rss[1] - rss[0], "sessions": idle},
    })
}

/// Connects to `addr` every 2 ms until stopped; counts attempts and failures.
fn prober(addr: SocketAddr, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<(u64, u64)> {
    std::thread::spawn(move || {
        let (mut tries, mut failed) = (0u64, 0u64);
        while !stop.load(Ordering::Relaxed) {
            tries += 1;
            if TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_err() {
                failed += 1;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        (tries, failed)
    })
}

/// `upgrades` live upgrades of `d`, 2 s apart; the last daemon and each upgrade's figures.
fn upgrade_rounds(
    mut d: Daemon,
    sock: &Path,
    state: &Path,
    shards: usize,
    upgrades: usize,
) -> (Daemon, Vec<serde_json::Value>) {
    let mut out = Vec::new();
    for u in 0..upgrades {
        let t0 = Instant::now();
        // If the hand-over hangs, the old daemon's log says where.
        let old_lines = d.lines.clone();
        let watching = Arc::new(AtomicBool::new(true));
        let w2 = watching.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(8));
            if w2.load(Ordering::Relaxed) {
                let l = old_lines.lock().map(|l| l.clone()).unwrap_or_default();
                for line in &l[l.len().saturating_sub(20)..] {
                    eprintln!("[old clawtermd] {line}");
                }
            }
        });
        let next = Daemon::start(sock, Some(state), shards, &["--upgrade"]);
        watching.store(false, Ordering::Relaxed);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !d.exited() {
            assert!(Instant::now() < deadline, "the old daemon did not exit");
            std::thread::sleep(Duration::from_millis(1));
        }
        let to_exit = t0.elapsed();
        let took = next.line("upgrade: took over").unwrap_or_default();
        let handed = d.line("upgrade: handed over").unwrap_or_default();
        let fig = serde_json::json!({
            "start_to_old_exit_ms": to_exit.as_secs_f64() * 1000.0,
            "start_to_listening_ms": next.started_in.as_secs_f64() * 1000.0,
            "took_ms": num_after(&took, "took_ms="),
            "frozen_ms": num_after(&handed, "frozen_ms="),
            "sessions": num_after(&took, "sessions="),
            "connections": num_after(&took, "connections="),
            "bytes": num_after(&took, "bytes="),
        });
        say(format!("upgrade {u}: {fig}"));
        out.push(fig);
        d = next;
        std::thread::sleep(Duration::from_secs(2));
    }
    (d, out)
}

fn wait_up(child: &mut std::process::Child) -> Lines {
    let (tx, rx) = std::sync::mpsc::channel();
    let lines = harness::collect_lines(child.stderr.take().expect("piped"), move |l| {
        if l.contains("sessions up") {
            let _ = tx.send(());
        }
    });
    if rx.recv_timeout(Duration::from_secs(120)).is_err() {
        panic!(
            "loadgen never opened its sessions: {:?}",
            lines.lock().unwrap()
        );
    }
    lines
}

fn read_json(child: std::process::Child) -> serde_json::Value {
    let out = child.wait_with_output().expect("loadgen");
    serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
}

fn busy(dir: &Path, sock: &Path, n: usize, upgrades: usize) -> serde_json::Value {
    let state = dir.join("busy-state");
    let d = Daemon::start(sock, Some(&state), 2, &[]);
    let addr = d.addr;
    let secs = 4 + upgrades * 3;
    let mut lg = loadgen_spawn(&[
        s("echo"),
        s("--target"),
        s(addr),
        s("--sessions"),
        s(n),
        s("--rate"),
        s(n * 5),
        s("--duration"),
        s(secs),
        s("--warmup"),
        s(0),
    ]);
    let _lines = wait_up(&mut lg);
    std::thread::sleep(Duration::from_secs(1));
    let stop_probe = Arc::new(AtomicBool::new(false));
    let probe = prober(addr, stop_probe.clone());
    let (d, rounds) = upgrade_rounds(d, sock, &state, 2, upgrades);
    stop_probe.store(true, Ordering::Relaxed);
    let (tries, refused) = probe.join().unwrap_or((0, 0));
    let v = read_json(lg);
    stop(d);
    serde_json::json!({
        "sessions": n, "upgrades": rounds,
        "loadgen_ok": v["ok"], "problems": v["problems"],
        "echoes_sent": v["sent"], "echoes_received": v["received_in_window"],
        "lost": v["lost_in_window"], "mismatched": v["mismatched_echoes"],
        "echo_latency_us": v["latency_us"],
        "longest_wait_ms": v["latency_us"]["max"].as_f64().map(|x| x / 1000.0),
        "prober_connects": tries, "prober_refused": refused,
    })
}

fn idle(dir: &Path, sock: &Path, n: usize, upgrades: usize) -> serde_json::Value {
    let state = dir.join("idle-state");
    let d = Daemon::start(sock, Some(&state), 2, &[]);
    let addr = d.addr;
    let secs = 6 + upgrades * 3;
    let mut lg = loadgen_spawn(&[
        s("idle"),
        s("--target"),
        s(addr),
        s("--sessions"),
        s(n),
        s("--duration"),
        s(secs),
    ]);
    let _l1 = wait_up(&mut lg);
    let mut probes = loadgen_spawn(&[
        s("echo"),
        s("--target"),
        s(addr),
        s("--sessions"),
        s(50),
        s("--rate"),
        s(500),
        s("--duration"),
        s(secs - 2),
        s("--warmup"),
        s(0),
    ]);
    let _l2 = wait_up(&mut probes);
    std::thread::sleep(Duration::from_secs(1));
    let stop_probe = Arc::new(AtomicBool::new(false));
    let probe = prober(addr, stop_probe.clone());
    let (d, rounds) = upgrade_rounds(d, sock, &state, 2, upgrades);
    stop_probe.store(true, Ordering::Relaxed);
    let (tries, refused) = probe.join().unwrap_or((0, 0));
    let pv = read_json(probes);
    let v = read_json(lg);
    stop(d);
    serde_json::json!({
        "sessions": n, "upgrades": rounds,
        "idle_ok": v["ok"], "idle_alive_at_end": v["sessions_alive_at_end"],
        "probes_ok": pv["ok"], "probe_latency_us": pv["latency_us"],
        "longest_wait_ms": pv["latency_us"]["max"].as_f64().map(|x| x / 1000.0),
        "prober_connects": tries, "prober_refused": refused,
    })
}

// ---------------------------------------------------------------------------------------------

/// What resumes a session: id, the SEQ it holds, token, and the output it has pending.
type Cred = (u32, u32, [u8; 16], String);

/// A blocking client of one session: just enough protocol for CONNECT, DATA and RESUME.
struct Raw {
    s: TcpStream,
    buf: Vec<u8>,
    seq: u32,
}

impl Raw {
    fn connect(addr: SocketAddr) -> std::io::Result<Raw> {
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.set_nodelay(true)?;
        Ok(Raw {
            s,
            buf: Vec::new(),
            seq: 0,
        })
    }

    fn send(&mut self, sid: u32, ty: FrameType, payload: &[u8]) -> std::io::Result<()> {
        self.seq += 1;
        let mut out = Vec::new();
        proto::encode_to_vec(&mut out, sid, self.seq, ty, 0, payload);
        self.s.write_all(&out)
    }

    /// The next frame other than KEEPALIVE/ACK: (type, seq, payload).
    fn recv(&mut self) -> std::io::Result<(FrameType, u32, Vec<u8>)> {
        loop {
            if let Ok(Decoded::Frame(f, used)) = proto::decode(&self.buf, proto::MAX_PAYLOAD) {
                let r = (f.ty, f.seq, f.payload.to_vec());
                self.buf.drain(..used);
                if matches!(r.0, FrameType::Keepalive | FrameType::Ack) {
                    continue;
                }
                return Ok(r);
            }
            let mut b = [0u8; 4096];
            let n = self.s.read(&mut b)?;
            if n == 0 {
                return Err(ErrorKind::UnexpectedEof.into());
            }
            self.buf.extend_from_slice(&b[..n]);
        }
    }
}

fn kill(dir: &Path, sock: &Path, n: usize) -> serde_json::Value {
    harness::raise_nofile();
    let state = dir.join("kill-state");
    let d = Daemon::start(sock, Some(&state), 2, &[]);
    let addr = d.addr;
    // Sessions with one echo pending each (sent, never read).
    let mut creds = Vec::with_capacity(n);
    let mut conns = Vec::with_capacity(n);
    let t0 = Instant::now();
    for i in 0..n {
        let mut c = Raw::connect(addr).expect("connect");
        let connect = proto::Connect {
            version: 1,
            caps: proto::CAP_V1,
            caps_width: proto::payload::CapsWidth::U8,
            tenant_id: TENANT,
            agent_id: AGENT,
            token: [0xAB; 32],
            nonce: [0x42; 16],
        };
        let mut p = Vec::new();
        connect.encode(&mut p);
        c.send(0, FrameType::Connect, &p).expect("CONNECT");
        let (ty, seq, payload) = c.recv().expect("ACCEPT");
        assert_eq!(ty, FrameType::Accept);
        let a = proto::Accept::parse(&payload).expect("ACCEPT payload");
        let token = a.resume_token.expect("a resume token");
        c.send(a.session_id, FrameType::Data, format!("k-{i};").as_bytes())
            .expect("DATA");
        creds.push((a.session_id, seq, token, format!("k-{i};")));
        conns.push(c);
    }
    say(format!(
        "kill: {n} sessions opened in {:.1} s",
        t0.elapsed().as_secs_f64()
    ));
    std::thread::sleep(Duration::from_secs(2)); // every echo reached its session's ring
    let mut d = d;
    harness::signal(d.pid(), libc::SIGKILL);
    let _ = d.proc.0.wait();
    drop(conns);
    let t0 = Instant::now();
    let next = Daemon::start(sock, Some(&state), 2, &[]);
    let listening = next.started_in;
    // (--port 0: the new daemon has a port of its own.)
    let addr = next.addr;
    let opened = next.line("state dir opened").unwrap_or_default();
    let restored = num_after(&opened, "sessions=");
    let fold_ms = num_after(&opened, "took_ms=");
    // Every session RESUMEs (8 threads), expecting exactly its pending echo.
    let expected: u64 = creds.iter().map(|c| c.3.len() as u64).sum();
    let got = Arc::new(AtomicU64::new(0));
    let extra = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let chunks: Vec<Vec<Cred>> = creds
        .chunks(creds.len().div_ceil(8).max(1))
        .map(|c| c.to_vec())
        .collect();
    let threads: Vec<_> = chunks
        .into_iter()
        .map(|chunk| {
            let (got, extra, failed) = (got.clone(), extra.clone(), failed.clone());
            std::thread::spawn(move || {
                for (sid, accept_seq, token, want) in chunk {
                    let r = (|| -> std::io::Result<Vec<u8>> {
                        let mut c = Raw::connect(addr)?;
                        let mut p = Vec::new();
                        proto::Resume::Full {
                            session_id: sid,
                            last_seq: accept_seq,
                            token,
                        }
                        .encode(&mut p);
                        c.send(sid, FrameType::Resume, &p)?;
                        let (ty, _, payload) = c.recv()?;
                        if ty != FrameType::Resumed {
                            return Err(std::io::Error::other(format!(
                                "{ty:?} instead of RESUMED: {:?}",
                                String::from_utf8_lossy(&payload)
                            )));
                        }
                        let mut data = Vec::new();
                        while data.len() < want.len() {
                            let (ty, _, payload) = c.recv()?;
                            if ty == FrameType::Data {
                                data.extend_from_slice(&payload);
                            }
                        }
                        Ok(data)
                    })();
                    match r {
                        Ok(data) if data == want.as_bytes() => {
                            got.fetch_add(data.len() as u64, Ordering::Relaxed);
                        }
                        Ok(data) => {
                            let common = data.len().min(want.len()) as u64;
                            got.fetch_add(common, Ordering::Relaxed);
                            extra.fetch_add(data.len() as u64 - common, Ordering::Relaxed);
                        }
                        Err(e) => {
                            if failed.fetch_add(1, Ordering::Relaxed) == 0 {
                                say(format!("kill: first RESUME failure: {e}"));
                            }
                        }
                    }
                }
            })
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
    let all_resumed = t0.elapsed();
    stop(next);
    let got = got.load(Ordering::Relaxed);
    serde_json::json!({
        "sessions": n,
        "restored": restored,
        "start_to_listening_ms": listening.as_secs_f64() * 1000.0,
        "fold_ms": fold_ms,
        "start_to_all_resumed_ms": all_resumed.as_secs_f64() * 1000.0,
        "resume_failures": failed.load(Ordering::Relaxed),
        "pending_bytes_expected": expected,
        "pending_bytes_replayed": got,
        "bytes_lost": expected.saturating_sub(got),
        "bytes_extra": extra.load(Ordering::Relaxed),
    })
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "-h" || a == "--help") {
        println!(
            "restart_figures [--idle N] [--busy N] [--kill N] [--upgrades U] [--reps R] [--json FILE] [--only cost|busy|idle|kill]\n\
             Figures of sessions that outlive clawtermd (see the module documentation in bench/src/bin/restart_figures.rs)."
        );
        return;
    }
    let n_idle: usize = arg(&args, "--idle", 10_000);
    let n_busy: usize = arg(&args, "--busy", 2_000);
    let n_kill: usize = arg(&args, "--kill", 10_000);
    let upgrades: usize = arg(&args, "--upgrades", 3);
    let reps: usize = arg(&args, "--reps", 3);
    let only: String = arg(&args, "--only", String::new());
    let json: Option<PathBuf> = args
        .iter()
        .position(|a| a == "--json")
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from);
    harness::raise_nofile();
    let dir = std::env::temp_dir().join(format!("ct-restart-figures-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let sock = dir.join("sock");
    std::fs::create_dir_all(&sock).expect("create the socket directory");
    let _agent = harness::start_agent(&sock, TENANT, AGENT, &["echo"]);
    let want = |p: &str| only.is_empty() || only == p;
    let mut out = serde_json::Map::new();
    out.insert("tool".into(), "restart_figures".into());
    if want("cost") {
        out.insert("cost".into(), cost(&dir, &sock, reps, n_idle));
    }
    if want("busy") {
        out.insert("busy_upgrade".into(), busy(&dir, &sock, n_busy, upgrades));
    }
    if want("idle") {
        out.insert("idle_upgrade".into(), idle(&dir, &sock, n_idle, upgrades));
    }
    if want("kill") {
        out.insert("kill_restart".into(), kill(&dir, &sock, n_kill));
    }
    let v = serde_json::Value::Object(out);
    let text = serde_json::to_string_pretty(&v).unwrap_or_default();
    println!("{text}");
    if let Some(p) = json {
        if let Err(e) = std::fs::write(&p, &text) {
            eprintln!("cannot write {}: {e}", p.display());
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
