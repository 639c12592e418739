//! `clawtermctl`: the operator's tool. It talks to a node's admin endpoint (`--admin`, default
//! 127.0.0.1:9720): the node's sessions, the cluster's nodes, moving one session to another
//! node, and draining the node (moving every session off it).

use clap::{Parser, Subcommand};
use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::process::ExitCode;
use std::time::Duration;

/// Operate a clawtermd node and its ClawRoam cluster.
///
/// Exit status: 0 done; 1 the node answered with an error, or (drain) some session could not
/// move; 2 usage; 3 the node's admin endpoint is unreachable.
#[derive(Parser, Debug)]
#[command(name = "clawtermctl", version, about, long_about)]
struct Args {
    /// The node's admin endpoint (clawtermd --admin).
    #[arg(
        long,
        env = "CLAWTERM_ADMIN",
        default_value = "127.0.0.1:9720",
        global = true
    )]
    admin: String,
    /// Print the node's JSON answer (for scripts) instead of a table.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// This node's sessions: id, tenant, agent, state, node, bytes in the replay ring, and
    /// whether a drain can move it.
    Sessions,
    /// The cluster's nodes as the keeper sees them.
    Nodes,
    /// Move one session to another node, warm first: its client follows (ROAM) and its agent
    /// state moves with it. On any failure the session stays here, nothing lost.
    Roam {
        /// The session id (hex, as `sessions` shows it).
        id: String,
        /// The node to move it to (its --node-id).
        #[arg(long)]
        to: String,
        /// Move it even if its agent cannot export its state (pod-link version 1): the
        /// target's agent starts the session afresh.
        #[arg(long)]
        force: bool,
    },
    /// Move every session off this node (before maintenance), to NODE or spread over the live
    /// nodes; progress every second, then a summary.
    Drain {
        /// The node to move them to [default: the least loaded live nodes].
        #[arg(long)]
        to: Option<String>,
        /// Also move sessions whose agents cannot export their state.
        #[arg(long)]
        force: bool,
        /// Drain only if the endpoint is served by the clawtermd of pod NAME (the DaemonSet's
        /// preStop: after a live upgrade the node's endpoint belongs to the newer pod, whose
        /// sessions stay). Without a value: this pod's, from $POD_NAME.
        #[arg(long, value_name = "NAME", num_args = 0..=1, default_missing_value = "")]
        only_pod: Option<String>,
        /// Sessions moving at once (1 to 256).
        #[arg(long, default_value_t = 256)]
        window: usize,
    },
}

fn main() -> ExitCode {
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let addr = match args.admin.to_socket_addrs().ok().and_then(|mut a| a.next()) {
        Some(a) => a,
        None => {
            eprintln!(
                "clawtermctl: --admin {}: not an ADDR:PORT (e.g. 127.0.0.1:9720)",
                args.admin
            );
            return ExitCode::from(2);
        }
    };
    match run(&args, addr) {
        Ok(code) => code,
        Err(Failure::Unreachable(e)) => {
            eprintln!("clawtermctl: cannot reach the admin endpoint at {addr}: {e}\n  is clawtermd running there? (its --admin option; clawtermctl --admin ADDR:PORT)");
            ExitCode::from(3)
        }
        Err(Failure::Node(e)) => {
            eprintln!("clawtermctl: {e}");
            ExitCode::from(1)
        }
    }
}

enum Failure {
    Unreachable(std::io::Error),
    Node(String),
}

fn run(args: &Args, addr: SocketAddr) -> Result<ExitCode, Failure> {
    match &args.cmd {
        Cmd::Sessions => {
            let v = get_json(addr, "GET", "/v1/sessions")?;
            if args.json {
                println!("{v}");
                return Ok(ExitCode::SUCCESS);
            }
            let rows = v["sessions"].as_array().cloned().unwrap_or_default();
            println!(
                "{:<10} {:>8} {:>8} {:<10} {:<16} {:>10} MOVABLE",
                "ID", "TENANT", "AGENT", "STATE", "NODE", "RING"
            );
            for r in &rows {
                println!(
                    "{:<10} {:>8} {:>8} {:<10} {:<16} {:>10} {}",
                    r["id"].as_str().unwrap_or("?"),
                    r["tenant"],
                    r["agent"],
                    r["state"].as_str().unwrap_or("?"),
                    r["node"].as_str().filter(|n| !n.is_empty()).unwrap_or("-"),
                    r["ring_bytes"],
                    if r["movable"].as_bool() == Some(true) {
                        "yes"
                    } else {
                        "no"
                    }
                );
            }
            eprintln!("{} sessions", rows.len());
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Nodes => {
            let v = get_json(addr, "GET", "/v1/nodes")?;
            if let Some(e) = v["error"].as_str() {
                return Err(Failure::Node(e.to_string()));
            }
            if args.json {
                println!("{v}");
                return Ok(ExitCode::SUCCESS);
            }
            println!(
                "{:<16} {:<6} {:<22} {:<22} {:>9} {:>6} {:>7}",
                "NODE", "STATE", "CLIENTS", "PEER", "SESSIONS", "SHARDS", "ORDINAL"
            );
            for n in v["nodes"].as_array().cloned().unwrap_or_default() {
                let me = if n["self"].as_bool() == Some(true) {
                    " (this node)"
                } else {
                    ""
                };
                println!(
                    "{:<16} {:<6} {:<22} {:<22} {:>9} {:>6} {:>7}{me}",
                    n["id"].as_str().unwrap_or("?"),
                    if n["alive"].as_bool() == Some(true) {
                        "up"
                    } else {
                        "down"
                    },
                    n["client"].as_str().unwrap_or("?"),
                    n["peer"].as_str().unwrap_or("?"),
                    n["sessions"],
                    n["shards"],
                    n["ordinal"],
                );
            }
            if v["keeper_up"].as_bool() == Some(false) {
                eprintln!("warning: this node cannot reach the keeper right now");
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Roam { id, to, force } => {
            let id = id.trim_start_matches("0x");
            if u32::from_str_radix(id, 16).is_err() {
                eprintln!("clawtermctl: `{id}` is not a session id (8 hex digits, as `clawtermctl sessions` shows)");
                return Ok(ExitCode::from(2));
            }
            let path = format!(
                "/v1/roam?id={id}&to={to}{}",
                if *force { "&force=1" } else { "" }
            );
            let v = get_json(addr, "POST", &path)?;
            if args.json {
                println!("{v}");
            }
            match v["result"].as_str() {
                Some("moved") => {
                    if !args.json {
                        println!("session {id} moved to {to} in {} ms", v["took_ms"]);
                    }
                    Ok(ExitCode::SUCCESS)
                }
                Some(r) => Err(Failure::Node(format!(
                    "session {id} not moved ({r}): {}",
                    v["why"].as_str().unwrap_or("?")
                ))),
                None => Err(Failure::Node(format!("unexpected answer: {v}"))),
            }
        }
        Cmd::Drain {
            to,
            force,
            only_pod,
            window,
        } => {
            let mut path = format!("/v1/drain?window={window}&");
            if let Some(t) = to {
                path.push_str(&format!("to={t}&"));
            }
            if let Some(p) = only_pod {
                let p = if p.is_empty() {
                    std::env::var("POD_NAME").unwrap_or_default()
                } else {
                    p.clone()
                };
                if p.is_empty() {
                    eprintln!("clawtermctl: --only-pod without a name needs $POD_NAME (the DaemonSet sets it)");
                    return Ok(ExitCode::from(2));
                }
                path.push_str(&format!("pod={p}&"));
            }
            if *force {
                path.push_str("force=1");
            }
            let mut all_moved = false;
            stream_lines(addr, "POST", &path, |line: Value| {
                if args.json {
                    println!("{line}");
                }
                if let Some(e) = line["error"].as_str() {
                    eprintln!("clawtermctl: drain refused: {e}");
                } else if line["progress"].as_bool() == Some(true) {
                    if !args.json {
                        eprintln!(
                            "draining: {}/{} moved, {} failed, {} in flight ({:.1} s)",
                            line["moved"],
                            line["total"],
                            line["failed"],
                            line["in_flight"],
                            line["elapsed_s"].as_f64().unwrap_or(0.0)
                        );
                    }
                } else if let Some(skip) = line["skipped"].as_str() {
                    all_moved = true;
                    if !args.json {
                        println!("drain skipped: {skip}");
                    }
                } else if line["summary"].as_bool() == Some(true) {
                    all_moved = line["failed"].as_u64() == Some(0)
                        && line["moved"].as_u64() == line["total"].as_u64();
                    if !args.json {
                        println!(
                            "drained: {} of {} sessions moved in {:.2} s ({:.0}/s), {} could not move",
                            line["moved"],
                            line["total"],
                            line["elapsed_s"].as_f64().unwrap_or(0.0),
                            line["per_second"].as_f64().unwrap_or(0.0),
                            line["failed"]
                        );
                        for f in line["failures"].as_array().cloned().unwrap_or_default() {
                            println!(
                                "  {}: {}",
                                f["id"].as_str().unwrap_or("?"),
                                f["why"].as_str().unwrap_or("?")
                            );
                        }
                    }
                }
            })?;
            Ok(if all_moved {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
    }
}

/// Sends a request and returns the response's status code and a reader at its body.
fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
) -> Result<(u16, BufReader<TcpStream>), Failure> {
    let mut s =
        TcpStream::connect_timeout(&addr, Duration::from_secs(3)).map_err(Failure::Unreachable)?;
    // A drain reports at least once a second; a node that says nothing for a minute is stuck.
    let _ = s.set_read_timeout(Some(Duration::from_secs(60)));
    let req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).map_err(Failure::Unreachable)?;
    let mut r = BufReader::new(s);
    let mut head = Vec::new();
    loop {
        let mut line = Vec::new();
        let n = r
            .read_until(b'\n', &mut line)
            .map_err(|e| Failure::Node(format!("reading the answer: {e}")))?;
        head.extend_from_slice(&line);
        if n == 0 || line == b"\r\n" || line == b"\n" || head.len() > 16384 {
            break;
        }
    }
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    match resp.parse(&head) {
        Ok(httparse::Status::Complete(_)) => {}
        _ => return Err(Failure::Node("the node's answer is not HTTP".into())),
    }
    Ok((resp.code.unwrap_or(0), r))
}

fn get_json(addr: SocketAddr, method: &str, path: &str) -> Result<Value, Failure> {
    let (code, mut r) = request(addr, method, path)?;
    let mut body = String::new();
    r.read_to_string(&mut body)
        .map_err(|e| Failure::Node(format!("reading the answer: {e}")))?;
    match serde_json::from_str::<Value>(&body) {
        Ok(v) => Ok(v),
        Err(_) => Err(Failure::Node(format!(
            "the node answered {code}: {}",
            body.trim()
        ))),
    }
}

fn stream_lines(
    addr: SocketAddr,
    method: &str,
    path: &str,
    mut each: impl FnMut(Value),
) -> Result<(), Failure> {
    let (code, r) = request(addr, method, path)?;
    if code != 200 {
        let body: String = r
            .lines()
            .map_while(Result::ok)
            .collect::<Vec<_>>()
            .join(" ");
        return Err(Failure::Node(format!("the node answered {code}: {body}")));
    }
    for line in r.lines() {
        let line = line.map_err(|e| Failure::Node(format!("reading progress: {e}")))?;
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Value>(&line) {
            Ok(v) => each(v),
            Err(_) => return Err(Failure::Node(format!("unexpected answer: {line}"))),
        }
    }
    Ok(())
}
