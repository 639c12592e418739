//! WebSocket figures for docs/BENCHMARKS.md ("WebSocket"), against one real `clawtermd`
//! (release, `--shards 1 --cpus 0`, plaintext, its `claw-agent echo` pod) driven by `loadgen`
//! (its epoll driver; `--transport ws` sends one masked binary message per write, as the page
//! and `@clawterm/client` do):
//!
//! (a) **Echo throughput and latency, WebSocket versus TCP, in the same run**: closed loop
//!     (`--rate 0`: each session always has one 32-byte echo in flight), `--sessions` sessions,
//!     `--secs` seconds per rep; reps alternate TCP and WebSocket against the same server; the
//!     medians are reported and the ratio of WebSocket to TCP throughput.
//! (b) **Server RSS per idle session**: `loadgen idle --server-pid` opens `--idle` sessions
//!     (TCP on one fresh server, WebSocket on another) and reports the RSS growth per session;
//!     the difference is what a WebSocket costs over a TCP session.
//!
//! ```text
//! cargo build --release -p clawterm -p loadgen --bins && cargo build --release -p clawterm-bench --bin ws_figures
//! ./target/release/ws_figures [--sessions 200] [--secs 5] [--reps 3] [--idle 5000] [--json FILE]
//! ```

use clawterm_testkit as harness;
use harness::client::{hex, AGENT, TENANT, TOKEN};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::process::Command;

struct Args {
    sessions: usize,
    secs: f64,
    reps: usize,
    idle: usize,
    json: Option<String>,
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        sessions: 200,
        secs: 5.0,
        reps: 3,
        idle: 5000,
        json: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || it.next().ok_or(format!("{k} needs a value"));
        match k.as_str() {
            "--sessions" => a.sessions = v()?.parse().map_err(|e| format!("{k}: {e}"))?,
            "--secs" => a.secs = v()?.parse().map_err(|e| format!("{k}: {e}"))?,
            "--reps" => a.reps = v()?.parse().map_err(|e| format!("{k}: {e}"))?,
            "--idle" => a.idle = v()?.parse().map_err(|e| format!("{k}: {e}"))?,
            "--json" => a.json = Some(v()?),
            "-h" | "--help" => {
                println!(
                    "ws_figures [--sessions N] [--secs S] [--reps R] [--idle N] [--json FILE]"
                );
                std::process::exit(0);
            }
            _ => return Err(format!("unknown argument {k}")),
        }
    }
    Ok(a)
}

/// One plaintext server, one shard on CPU 0, with its echo pod.
struct Server {
    proc: harness::Proc,
    _agent: harness::Proc,
    tcp: SocketAddr,
    ws: SocketAddr,
    _dir: harness::TempDir,
}

fn server() -> Server {
    let dir = harness::TempDir::with_sock("ws-figures");
    let sock = dir.sock();
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, format!("{TENANT} {}\n", hex(&TOKEN))).expect("tokens");
    let agent = harness::start_agent(&sock, TENANT, AGENT, &["echo"]);
    let mut cmd = harness::plaintext_clawtermd(&tokens, &sock);
    cmd.args([
        "--shards",
        "1",
        "--cpus",
        "0",
        "--admin",
        "off",
        "--no-quic",
    ])
    .env("RUST_LOG", "warn,clawtermd=info");
    let (child, _lines, line) = harness::start_server(&mut cmd, "clawtermd");
    Server {
        proc: harness::Proc(child),
        _agent: agent,
        tcp: harness::tcp_addr(&line).expect("tcp address"),
        ws: harness::ws_addr(&line).expect("websocket address"),
        _dir: dir,
    }
}

fn loadgen(args: &[String]) -> Value {
    let exe = harness::loadgen_bin();
    let out = Command::new(&exe)
        .args(args)
        .args([
            "--tenant",
            &TENANT.to_string(),
            "--agent",
            &AGENT.to_string(),
        ])
        .args(["--token", &hex(&TOKEN)])
        .output()
        .unwrap_or_else(|e| panic!("run {}: {e}", exe.display()));
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim()).unwrap_or_else(|_| {
        panic!(
            "loadgen printed no JSON: {text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        0.0
    } else {
        v[v.len() / 2]
    }
}

fn main() {
    let a = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("ws_figures: {e}");
            std::process::exit(2);
        }
    };
    let mut failed = false;
    // (a) Echo, alternating transports against one server.
    let s = server();
    let (mut tput, mut p99, mut p50) = (
        [Vec::new(), Vec::new()],
        [Vec::new(), Vec::new()],
        [Vec::new(), Vec::new()],
    );
    for rep in 0..a.reps {
        for (k, (name, addr)) in [("tcp", s.tcp), ("ws", s.ws)].into_iter().enumerate() {
            eprintln!(
                "echo rep {}/{}: {name}, {} sessions, closed loop",
                rep + 1,
                a.reps,
                a.sessions
            );
            let v = loadgen(&[
                "echo".into(),
                "--target".into(),
                addr.to_string(),
                "--transport".into(),
                name.into(),
                "--sessions".into(),
                a.sessions.to_string(),
                "--rate".into(),
                "0".into(),
                "--duration".into(),
                a.secs.to_string(),
                "--server-pid".into(),
                s.proc.pid().to_string(),
            ]);
            if v["ok"] != json!(true) {
                eprintln!("loadgen echo over {name} failed: {v}");
                failed = true;
            }
            let n = v["received_in_window"].as_f64().unwrap_or(0.0);
            let secs = v["measured_seconds"].as_f64().unwrap_or(a.secs).max(1e-9);
            tput[k].push(n / secs);
            p99[k].push(v["latency_us"]["p99"].as_f64().unwrap_or(0.0));
            p50[k].push(v["latency_us"]["p50"].as_f64().unwrap_or(0.0));
            eprintln!(
                "  {name}: {:.0} echoes/s, p50 {} µs, p99 {} µs",
                n / secs,
                v["latency_us"]["p50"],
                v["latency_us"]["p99"]
            );
        }
    }
    drop(s);
    let (t_tcp, t_ws) = (median(&mut tput[0]), median(&mut tput[1]));
    // (b) Idle sessions, a fresh server per transport.
    let mut idle = serde_json::Map::new();
    for name in ["tcp", "ws"] {
        let s = server();
        let addr = if name == "tcp" { s.tcp } else { s.ws };
        eprintln!("idle: {} {name} sessions", a.idle);
        let v = loadgen(&[
            "idle".into(),
            "--target".into(),
            addr.to_string(),
            "--transport".into(),
            name.into(),
            "--sessions".into(),
            a.idle.to_string(),
            "--duration".into(),
            "2".into(),
            "--server-pid".into(),
            s.proc.pid().to_string(),
        ]);
        if v["ok"] != json!(true) {
            eprintln!("loadgen idle over {name} failed: {v}");
            failed = true;
        }
        idle.insert(name.into(), v["server_rss_bytes_per_session"].clone());
    }
    let per = |k: &str| idle.get(k).and_then(Value::as_f64).unwrap_or(0.0);
    let out = json!({
        "figures": "websocket",
        "echo": {
            "sessions": a.sessions,
            "secs": a.secs,
            "reps": a.reps,
            "tcp": { "echoes_per_s": t_tcp, "p50_us": median(&mut p50[0]), "p99_us": median(&mut p99[0]) },
            "ws": { "echoes_per_s": t_ws, "p50_us": median(&mut p50[1]), "p99_us": median(&mut p99[1]) },
            "throughput_ratio": if t_tcp > 0.0 { t_ws / t_tcp } else { 0.0 },
        },
        "idle": {
            "sessions": a.idle,
            "tcp_rss_bytes_per_session": per("tcp"),
            "ws_rss_bytes_per_session": per("ws"),
            "ws_over_tcp_bytes": per("ws") - per("tcp"),
        },
    });
    println!("{out}");
    if let Some(p) = &a.json {
        let _ = std::fs::write(p, format!("{out:#}\n"));
    }
    if failed {
        std::process::exit(1);
    }
}
