//! The figures of ClawRoam (issue 15; docs/CLUSTER.md, docs/BENCHMARKS.md "ClawRoam"): a real
//! `redis-server` and `clawtermd` nodes on 127.0.0.1/.2, each with its `claw-agent echo` pod.
//!
//! * **cutover** (`--sessions N`): N echo sessions on node 1 (the client library, RELIABLE,
//!   following ROAM), each keeping one 32-byte echo in flight (closed loop), while node 1 is
//!   drained to node 2 — N moves under load. Per session, the **cutover gap** is its longest
//!   wait for an echo during the drain: it spans the freeze, the hand-over, ROAM, the reconnect
//!   and RESUME at the target and the resent input's echo, so it is an upper bound of "freeze
//!   → first byte from the target". p50/p99/max over the sessions, plus the server's own
//!   freeze → release (`clawterm_roam_seconds`, bucket bounds) and every echo checked exactly
//!   once, in order.
//! * **drain** (`--drain N`): N idle attached sessions on node 1, drained to node 2: total time,
//!   moves per second, and that every client followed (its session answers an echo at node 2).
//! * **keeper cost** (`--keeper-sessions N`): new sessions per second (CONNECT → ACCEPT, 8
//!   threads) and RESUME p99 against one node with `--keeper` and one without, alternating,
//!   `--reps` each.
//!
//! ```text
//! cargo build --release -p clawterm --bins && cargo build --release -p clawterm-bench --bin cluster_figures
//! ./target/release/cluster_figures [--sessions 1000] [--drain 10000] [--keeper-sessions 2000] [--reps 3] [--json FILE]
//! ```
//!
//! Progress on stderr, one JSON object on stdout (and `--json FILE`). Exit status 1 when
//! something failed functionally (a move failed, an echo was lost or doubled, a client did not
//! follow), never because a figure missed its goal; 2 for bad usage. Every wait is bounded.

use clawterm_client::{Event, Options, Session, Transport};
use clawterm_testkit as harness;
use harness::client::{hex, AGENT, TENANT, TOKEN};
use harness::cluster::{admin_request, secret_file, Node, Redis};
use serde_json::{json, Value};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

struct Args {
    sessions: usize,
    drain: usize,
    keeper_sessions: usize,
    reps: usize,
    json: Option<String>,
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        sessions: 1000,
        drain: 10_000,
        keeper_sessions: 2000,
        reps: 3,
        json: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || it.next().ok_or(format!("{k} needs a value"));
        match k.as_str() {
            "--sessions" => a.sessions = v()?.parse().map_err(|e| format!("{k}: {e}"))?,
            "--drain" => a.drain = v()?.parse().map_err(|e| format!("{k}: {e}"))?,
            "--keeper-sessions" => {
                a.keeper_sessions = v()?.parse().map_err(|e| format!("{k}: {e}"))?
            }
            "--reps" => a.reps = v()?.parse().map_err(|e| format!("{k}: {e}"))?,
            "--json" => a.json = Some(v()?),
            "-h" | "--help" => {
                println!("cluster_figures [--sessions N] [--drain N] [--keeper-sessions N] [--reps R] [--json FILE]");
                std::process::exit(0);
            }
            _ => return Err(format!("unknown argument {k}")),
        }
    }
    Ok(a)
}

fn opts() -> Options {
    Options {
        backoff: clawterm_client::Backoff::new(
            Duration::from_millis(5),
            Duration::from_millis(200),
        ),
        connect_timeout: Duration::from_secs(5),
        handshake_timeout: Duration::from_secs(10),
        transport: Transport::Plaintext,
        ..Options::default()
    }
}

struct Setup {
    redis: Redis,
    nodes: Vec<Node>,
    _dir: harness::TempDir,
}

fn setup(nodes: u8, extra: &[&str]) -> Setup {
    let redis = Redis::start();
    let dir = harness::TempDir::new("cluster-figures");
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, format!("{TENANT} {}\n", hex(&TOKEN))).expect("tokens");
    let secret = secret_file(dir.path(), "cluster figures secret, 32 bytes");
    let nodes: Vec<Node> = (1..=nodes)
        .map(|i| Node::start(i, &redis.url(), &tokens, &secret, &["echo"], extra))
        .collect();
    let ok = harness::wait_until(Duration::from_secs(10), || {
        nodes.iter().all(|n| {
            n.admin("GET", "/v1/nodes")
                .1
                .matches("\"alive\":true")
                .count()
                >= nodes.len()
        })
    });
    assert!(ok, "the nodes never saw each other");
    Setup {
        redis,
        nodes,
        _dir: dir,
    }
}

/// Sessions driven by one thread: each keeps one echo in flight; the longest wait per session
/// while `measuring` is on is its gap.
struct Driver {
    sessions: Vec<Session>,
    sent: Vec<u64>,
    got: Vec<Vec<u8>>,
    want: Vec<Vec<u8>>,
    in_flight: Vec<Option<Instant>>,
    max_wait: Vec<Duration>,
    errors: Vec<String>,
}

impl Driver {
    fn run(mut self, echo: bool, stop: Arc<AtomicBool>, measuring: Arc<AtomicBool>) -> Driver {
        let n = self.sessions.len();
        while !stop.load(Ordering::Relaxed) {
            let mut fds: Vec<libc::pollfd> = self
                .sessions
                .iter()
                .map(|s| libc::pollfd {
                    fd: s.poll_fd().map_or(-1, |f| f.as_raw_fd()),
                    events: libc::POLLIN,
                    revents: 0,
                })
                .collect();
            // SAFETY: `fds` is a valid array of `fds.len()` pollfd entries for the call.
            unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 5) };
            for i in 0..n {
                if echo && self.in_flight[i].is_none() {
                    let line = format!(
                        "{:08x} {:>10}\n",
                        self.sessions[i].session_id(),
                        self.sent[i]
                    );
                    self.sent[i] += 1;
                    if let Err(e) = self.sessions[i].send(line.as_bytes()) {
                        self.errors.push(format!("send: {e}"));
                        continue;
                    }
                    self.want[i].extend_from_slice(line.as_bytes());
                    self.in_flight[i] = Some(Instant::now());
                }
                loop {
                    match self.sessions[i].try_recv() {
                        Ok(Some(Event::Data(d))) => {
                            self.got[i].extend_from_slice(&d);
                            if self.got[i].len() >= self.want[i].len() {
                                if let Some(t) = self.in_flight[i].take() {
                                    if measuring.load(Ordering::Relaxed) {
                                        self.max_wait[i] = self.max_wait[i].max(t.elapsed());
                                    }
                                }
                            }
                        }
                        Ok(Some(_)) => {}
                        Ok(None) => break,
                        Err(e) => {
                            self.errors.push(format!("session: {e}"));
                            break;
                        }
                    }
                }
            }
        }
        self
    }
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn open(endpoint: &str, n: usize) -> Vec<Session> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        match Session::connect_with(endpoint, TENANT, AGENT, TOKEN, opts()) {
            Ok(s) => out.push(s),
            Err(e) => panic!("session {i} at {endpoint}: {e}"),
        }
        if i % 1000 == 999 {
            eprintln!("  {} sessions open", i + 1);
        }
    }
    out
}

/// Drains node 1 to node 2 over the admin endpoint; the summary line.
fn drain(node: &Node, to: &str) -> Value {
    let (code, body) = admin_request(node.admin, "POST", &format!("/v1/drain?to={to}"));
    assert_eq!(code, 200, "drain: {body}");
    body.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["summary"].as_bool() == Some(true))
        .unwrap_or_else(|| panic!("no drain summary: {body}"))
}

fn spread(sessions: Vec<Session>, threads: usize) -> Vec<Driver> {
    let mut drivers: Vec<Driver> = (0..threads)
        .map(|_| Driver {
            sessions: Vec::new(),
            sent: Vec::new(),
            got: Vec::new(),
            want: Vec::new(),
            in_flight: Vec::new(),
            max_wait: Vec::new(),
            errors: Vec::new(),
        })
        .collect();
    for (i, s) in sessions.into_iter().enumerate() {
        let d = &mut drivers[i % threads];
        d.sessions.push(s);
        d.sent.push(0);
        d.got.push(Vec::new());
        d.want.push(Vec::new());
        d.in_flight.push(None);
        d.max_wait.push(Duration::ZERO);
    }
    drivers
}

fn cutover(n: usize, failed: &mut bool) -> Value {
    eprintln!("cutover: {n} echo sessions on node1, drained to node2 under load");
    let s = setup(2, &[]);
    let sessions = open(&s.nodes[0].endpoint(), n);
    let stop = Arc::new(AtomicBool::new(false));
    let measuring = Arc::new(AtomicBool::new(false));
    let handles: Vec<_> = spread(sessions, 8)
        .into_iter()
        .map(|d| {
            let (st, me) = (stop.clone(), measuring.clone());
            std::thread::spawn(move || d.run(true, st, me))
        })
        .collect();
    std::thread::sleep(Duration::from_secs(2));
    measuring.store(true, Ordering::Relaxed);
    let t0 = Instant::now();
    let summary = drain(&s.nodes[0], "node2");
    let drain_s = t0.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_secs(2));
    measuring.store(false, Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    let mut gaps = Vec::new();
    let (mut lost, mut errors, mut followed) = (0usize, Vec::new(), 0usize);
    for h in handles {
        let d = h.join().expect("driver thread");
        for i in 0..d.sessions.len() {
            gaps.push(d.max_wait[i].as_secs_f64() * 1000.0);
            let complete = d.got[i].len() - d.got[i].len().min(d.want[i].len());
            let _ = complete;
            if !d.want[i].starts_with(&d.got[i]) {
                lost += 1;
            }
            if d.sessions[i].endpoint() == s.nodes[1].endpoint() {
                followed += 1;
            }
        }
        errors.extend(d.errors);
    }
    let server_hist = s.nodes[0].metric("clawterm_roam_seconds_count");
    if lost > 0
        || !errors.is_empty()
        || followed != n
        || summary["moved"].as_u64() != Some(n as u64)
    {
        *failed = true;
    }
    let p50 = percentile(&mut gaps, 0.5);
    let p99 = percentile(&mut gaps, 0.99);
    let max = percentile(&mut gaps, 1.0);
    eprintln!(
        "  cutover gap p50 {p50:.1} ms, p99 {p99:.1} ms, max {max:.1} ms; drain {drain_s:.2} s"
    );
    drop(s.redis);
    json!({
        "sessions": n,
        "moved": summary["moved"],
        "failed_moves": summary["failed"],
        "drain_s": drain_s,
        "gap_ms": { "p50": p50, "p99": p99, "max": max },
        "server_roams_timed": server_hist,
        "clients_followed": followed,
        "echo_streams_broken": lost,
        "errors": errors.len(),
        "first_errors": errors.iter().take(5).collect::<Vec<_>>(),
    })
}

fn drain_figure(n: usize, failed: &mut bool) -> Value {
    eprintln!("drain: {n} idle sessions on node1, drained to node2");
    let s = setup(2, &[]);
    let sessions = open(&s.nodes[0].endpoint(), n);
    let stop = Arc::new(AtomicBool::new(false));
    let measuring = Arc::new(AtomicBool::new(false));
    let handles: Vec<_> = spread(sessions, 8)
        .into_iter()
        .map(|d| {
            let (st, me) = (stop.clone(), measuring.clone());
            std::thread::spawn(move || d.run(false, st, me))
        })
        .collect();
    let t0 = Instant::now();
    let summary = drain(&s.nodes[0], "node2");
    let took = t0.elapsed().as_secs_f64();
    eprintln!("  drained {} in {took:.2} s", summary["moved"]);
    // Every client follows: wait until node 2 serves them all attached.
    let all = harness::wait_until(Duration::from_secs(60), || {
        s.nodes[1].metric("clawterm_sessions{state=\"attached\"") as usize >= n
            || s.nodes[1]
                .admin("GET", "/v1/sessions")
                .1
                .matches("\"attached\"")
                .count()
                >= n
    });
    stop.store(true, Ordering::Relaxed);
    let mut followed = 0;
    for h in handles {
        let d = h.join().expect("driver thread");
        followed += d
            .sessions
            .iter()
            .filter(|x| x.endpoint() == s.nodes[1].endpoint())
            .count();
    }
    if summary["moved"].as_u64() != Some(n as u64) || followed != n || !all {
        *failed = true;
    }
    json!({
        "sessions": n,
        "moved": summary["moved"],
        "failed_moves": summary["failed"],
        "total_s": took,
        "node_reported_s": summary["elapsed_s"],
        "per_second": summary["per_second"],
        "clients_followed": followed,
    })
}

/// New sessions per second (8 threads) and RESUME p99 against one node.
fn connect_resume(endpoint: &str, n: usize) -> (f64, f64) {
    let per = n / 8;
    let t0 = Instant::now();
    let handles: Vec<_> = (0..8)
        .map(|_| {
            let ep = endpoint.to_string();
            std::thread::spawn(move || {
                let mut creds = Vec::new();
                for _ in 0..per {
                    if let Ok(s) = Session::connect_with(&ep, TENANT, AGENT, TOKEN, opts()) {
                        creds.push(s.detach());
                    }
                }
                creds
            })
        })
        .collect();
    let creds: Vec<_> = handles
        .into_iter()
        .flat_map(|h| h.join().unwrap_or_default())
        .collect();
    let rate = creds.len() as f64 / t0.elapsed().as_secs_f64();
    let mut lat = Vec::new();
    for c in creds.iter().take(1000) {
        let t = Instant::now();
        if let Ok(s) = Session::resume_with(c, opts()) {
            lat.push(t.elapsed().as_secs_f64() * 1000.0);
            s.end();
        }
    }
    (rate, percentile(&mut lat, 0.99))
}

fn keeper_cost(n: usize, reps: usize) -> Value {
    eprintln!(
        "keeper cost: {n} new sessions and 1000 resumes, with and without --keeper, {reps} reps"
    );
    let s = setup(1, &[]);
    let dir = harness::TempDir::with_sock("solo");
    let _agent = harness::start_agent(&dir.sock(), TENANT, AGENT, &["echo"]);
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, format!("{TENANT} {}\n", hex(&TOKEN))).expect("tokens");
    let mut cmd = harness::plaintext_clawtermd(&tokens, &dir.sock());
    cmd.args(["--shards", "2", "--admin", "off", "--no-quic"]);
    let (child, _, line) = harness::start_server(&mut cmd, "solo clawtermd");
    let _solo = harness::Proc(child);
    let solo = harness::tcp_addr(&line).expect("address").to_string();
    let (mut with, mut without) = (Vec::new(), Vec::new());
    for r in 0..reps {
        let a = connect_resume(&s.nodes[0].endpoint(), n);
        let b = connect_resume(&solo, n);
        eprintln!(
            "  rep {r}: with keeper {:.0}/s p99 {:.2} ms; without {:.0}/s p99 {:.2} ms",
            a.0, a.1, b.0, b.1
        );
        with.push(a);
        without.push(b);
    }
    let med = |v: &Vec<(f64, f64)>, f: fn(&(f64, f64)) -> f64| {
        let mut x: Vec<f64> = v.iter().map(f).collect();
        percentile(&mut x, 0.5)
    };
    let (wr, wo) = (med(&with, |x| x.0), med(&without, |x| x.0));
    json!({
        "sessions": n,
        "reps": reps,
        "connects_per_s": { "with_keeper": wr, "without": wo, "ratio": wr / wo },
        "resume_p99_ms": { "with_keeper": med(&with, |x| x.1), "without": med(&without, |x| x.1) },
    })
}

fn main() {
    let a = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("cluster_figures: {e}");
            std::process::exit(2);
        }
    };
    harness::raise_nofile();
    let mut failed = false;
    let mut out = json!({ "figures": "cluster" });
    if a.sessions > 0 {
        out["cutover"] = cutover(a.sessions, &mut failed);
    }
    if a.drain > 0 {
        out["drain"] = drain_figure(a.drain, &mut failed);
    }
    if a.keeper_sessions > 0 {
        out["keeper_cost"] = keeper_cost(a.keeper_sessions, a.reps);
    }
    out["relay"] = json!({ "measured": false, "why": "relay for clients without ROAM is not built (docs/CLUSTER.md)" });
    println!("{out}");
    if let Some(p) = &a.json {
        if let Err(e) = std::fs::write(p, format!("{out}\n")) {
            eprintln!("cluster_figures: {p}: {e}");
        }
    }
    std::process::exit(i32::from(failed));
}
