//! The figures of ClawRoam (issue 15; docs/CLUSTER.md, docs/BENCHMARKS.md "ClawRoam"): a real
//! `redis-server` and `clawtermd` nodes on 127.0.0.1/.2, each with its `claw-agent echo` pod.
//! The sessions are driven by `loadgen roam` (the client library's sessions, RELIABLE,
//! following ROAM or not; loadgen/src/roam.rs).
//!
//! * **cutover** (`--sessions N`, default 1,000): N echo sessions on node 1, each keeping one
//!   echo in flight (closed loop), while node 1 is drained to node 2 — N moves under load. Per
//!   session the **cutover gap** is its longest wait for an echo during the drain: it spans
//!   the freeze, the hand-over, ROAM, the reconnect and RESUME at the target and the resent
//!   input's echo, so it bounds "freeze → first byte from the target" from above. p50/p99/max
//!   over the sessions, every echo checked exactly once, in order; plus the source's own
//!   freeze → release histogram (`clawterm_roam_seconds`).
//! * **drain** (`--drain N`, default 10,000): N idle attached sessions drained to node 2: total
//!   time and moves per second; then every session echoes once at node 2.
//! * **relay** (`--relay N`, default 200): N echo sessions whose clients do not follow ROAM,
//!   closed loop, 5 s direct at node 1, then node 1 drained to node 2 and 5 s relayed by node 1:
//!   echoes per second and mean round trip before and after, and their ratio.
//! * **keeper cost** (`--keeper-sessions N`): new sessions per second (CONNECT → ACCEPT, 8
//!   threads) and RESUME p99 against a node with `--keeper` and one without, alternating,
//!   `--reps` each.
//!
//! ```text
//! cargo build --release -p clawterm -p loadgen --bins && cargo build --release -p clawterm-bench --bin cluster_figures
//! ./target/release/cluster_figures [--sessions 1000] [--drain 10000] [--relay 200] [--keeper-sessions 2000] [--reps 3] [--json FILE]
//! ```
//!
//! Progress on stderr, one JSON object on stdout (and `--json FILE`). Exit status 1 when
//! something failed functionally (a move failed, an echo was lost or doubled, a client did not
//! follow), never because a figure missed its goal; 2 for bad usage. Every wait is bounded.

use clawterm_client::{Options, Session, Transport};
use clawterm_testkit as harness;
use harness::client::{hex, AGENT, TENANT, TOKEN};
use harness::cluster::{secret_file, Node, Redis};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

struct Args {
    sessions: usize,
    /// Echoes per second per session during the cutover run (0: closed loop).
    rate: f64,
    relay: usize,
    drain: usize,
    keeper_sessions: usize,
    reps: usize,
    json: Option<String>,
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        sessions: 1000,
        rate: 10.0,
        relay: 200,
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
            "--rate" => a.rate = v()?.parse().map_err(|e| format!("{k}: {e}"))?,
            "--relay" => a.relay = v()?.parse().map_err(|e| format!("{k}: {e}"))?,
            "--drain" => a.drain = v()?.parse().map_err(|e| format!("{k}: {e}"))?,
            "--keeper-sessions" => {
                a.keeper_sessions = v()?.parse().map_err(|e| format!("{k}: {e}"))?
            }
            "--reps" => a.reps = v()?.parse().map_err(|e| format!("{k}: {e}"))?,
            "--json" => a.json = Some(v()?),
            "-h" | "--help" => {
                println!("cluster_figures [--sessions N] [--rate R] [--drain N] [--relay N] [--keeper-sessions N] [--reps R] [--json FILE]");
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
    _redis: Redis,
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
        _redis: redis,
        nodes,
        _dir: dir,
    }
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

/// Runs `loadgen roam` against node 1 of `s` (draining it) with `extra`; its JSON.
fn loadgen_roam(s: &Setup, extra: &[&str], failed: &mut bool) -> Value {
    let loadgen = harness::loadgen_bin();
    let out = harness::cluster::roam_command(&loadgen, &s.nodes[0])
        .args(extra)
        .stderr(std::process::Stdio::inherit())
        .output()
        .expect("run loadgen roam");
    let v: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| json!({ "error": String::from_utf8_lossy(&out.stdout).into_owned() }));
    if !out.status.success() {
        *failed = true;
    }
    v
}

fn cutover(n: usize, rate: f64, failed: &mut bool) -> Value {
    eprintln!("cutover: {n} echo sessions on node1 ({rate}/s each; 0: closed loop), moved to node2 one at a time");
    let s = setup(2, &[]);
    // One move at a time: each session's gap is its own move's, not a queue's.
    let v = loadgen_roam(
        &s,
        &[
            "--sessions",
            &n.to_string(),
            "--to",
            "node2",
            "--window",
            "1",
            "--rate",
            &rate.to_string(),
        ],
        failed,
    );
    let server = s.nodes[0].admin("GET", "/metrics").1;
    let buckets: Vec<String> = server
        .lines()
        .filter(|l| l.starts_with("clawterm_roam_seconds_bucket"))
        .map(str::to_string)
        .collect();
    json!({ "loadgen": v, "server_freeze_to_release_buckets": buckets })
}

fn drain_figure(n: usize, failed: &mut bool) -> Value {
    eprintln!("drain: {n} idle sessions on node1, drained to node2");
    let s = setup(2, &[]);
    let v = loadgen_roam(
        &s,
        &[
            "--sessions",
            &n.to_string(),
            "--to",
            "node2",
            "--idle",
            "--settle",
            "5",
        ],
        failed,
    );
    json!({ "loadgen": v })
}

/// Echo through a relaying node versus direct, in the same run: clients that do not follow
/// ROAM, closed loop, before (direct at node 1) and after (relayed by node 1 to node 2) a drain.
fn relay(n: usize, failed: &mut bool) -> Value {
    eprintln!("relay: {n} echo sessions without ROAM, direct then relayed");
    let s = setup(2, &[]);
    let v = loadgen_roam(
        &s,
        &[
            "--sessions",
            &n.to_string(),
            "--to",
            "node2",
            "--no-roam-share",
            "1",
            "--warmup",
            "5",
            "--settle",
            "5",
        ],
        failed,
    );
    let before = v["before"]["echoes_per_s"].as_f64().unwrap_or(0.0);
    let after = v["after"]["echoes_per_s"].as_f64().unwrap_or(0.0);
    json!({
        "loadgen": v,
        "throughput_ratio": if before > 0.0 { after / before } else { 0.0 },
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
        out["cutover"] = cutover(a.sessions, a.rate, &mut failed);
    }
    if a.drain > 0 {
        out["drain"] = drain_figure(a.drain, &mut failed);
    }
    if a.keeper_sessions > 0 {
        out["keeper_cost"] = keeper_cost(a.keeper_sessions, a.reps);
    }
    if a.relay > 0 {
        out["relay"] = relay(a.relay, &mut failed);
    }
    println!("{out}");
    if let Some(p) = &a.json {
        if let Err(e) = std::fs::write(p, format!("{out}\n")) {
            eprintln!("cluster_figures: {p}: {e}");
        }
    }
    std::process::exit(i32::from(failed));
}
