//! `loadgen shells`: opens N shell sessions through clawtermd to a `claw-agent shell` pod and
//! measures what they cost (bench/shells.sh; docs/BENCHMARKS.md "Shell sessions").
//!
//! ```text
//! loadgen shells --target HOST:PORT --sessions N [--tenant T --agent A] [--window W]
//!     [--agent-pid PID] [--server-pid PID] [--timeout SECS] [--json FILE]
//! ```
//!
//! Session `i` is opened (the client library's blocking connect), then sent
//! `echo READY_$((i+0))`; it counts as answered when `READY_i` comes back (the typed echo shows
//! `READY_$((`, so only the shell's output matches). At most `--window` sessions are opening or
//! waiting for their answer at a time (default 16). Reported: the time until every shell
//! answered, the answer rate over the first and the last 10 % of the sessions, and — with
//! `--agent-pid` — the pod's descriptors and threads per session and the PSS of the pod and
//! every process under it (its shells), from /proc/PID/smaps_rollup, before and after.
//! The sessions stay open until the report is printed; the caller stops the pod.
//! Exit status: 0 when every session answered, 1 otherwise, 2 for bad usage.

use clawterm_client::{Event, Session};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::time::{Duration, Instant};

struct Args {
    target: String,
    sessions: usize,
    tenant: u32,
    agent: u32,
    window: usize,
    agent_pid: Option<u32>,
    server_pid: Option<u32>,
    timeout: Duration,
    json: Option<std::path::PathBuf>,
}

const USAGE: &str =
    "usage: loadgen shells --target HOST:PORT --sessions N [--tenant T] [--agent A] \
[--window W] [--agent-pid PID] [--server-pid PID] [--timeout SECS] [--json FILE]";

fn parse(args: &[String]) -> Result<Args, String> {
    let mut a = Args {
        target: String::new(),
        sessions: 100,
        tenant: 1,
        agent: 1,
        window: 16,
        agent_pid: None,
        server_pid: None,
        timeout: Duration::from_secs(900),
        json: None,
    };
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let mut val = || it.next().cloned().ok_or(format!("{flag} needs a value"));
        let num = |v: String| {
            v.parse::<u64>()
                .map_err(|_| format!("{flag}: `{v}` is not a non-negative integer"))
        };
        match flag.as_str() {
            "--target" => a.target = val()?,
            "--sessions" => a.sessions = num(val()?)?.clamp(1, 100_000) as usize,
            "--tenant" => a.tenant = num(val()?)? as u32,
            "--agent" => a.agent = num(val()?)? as u32,
            "--window" => a.window = num(val()?)?.clamp(1, 10_000) as usize,
            "--agent-pid" => a.agent_pid = Some(num(val()?)? as u32),
            "--server-pid" => a.server_pid = Some(num(val()?)? as u32),
            "--timeout" => a.timeout = Duration::from_secs(num(val()?)?.max(1)),
            "--json" => a.json = Some(val()?.into()),
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument `{other}`")),
        }
    }
    if a.target.is_empty() {
        return Err("--target HOST:PORT is required".into());
    }
    Ok(a)
}

/// One /proc reading of a process tree: the root's descriptors and threads, and the PSS of
/// the root and of every process under it.
#[derive(Clone, Copy, Debug, Default)]
pub struct TreeStat {
    pub root_fds: usize,
    pub root_threads: usize,
    pub root_pss_kib: u64,
    pub root_rss_kib: u64,
    pub root_maps: usize,
    /// Processes under the root (not counting it).
    pub descendants: usize,
    /// PSS of the root and every process under it.
    pub tree_pss_kib: u64,
}

fn count_dir(p: &str) -> usize {
    std::fs::read_dir(p).map(|d| d.count()).unwrap_or(0)
}

/// `Pss:` and `Rss:` of /proc/PID/smaps_rollup, KiB.
pub fn pss_rss_kib(pid: u32) -> (u64, u64) {
    let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")) else {
        return (0, 0);
    };
    let field = |name: &str| {
        s.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|r| r.split_whitespace().next())
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0)
    };
    (field("Pss:"), field("Rss:"))
}

/// Every process under `root` (children, their children, ...), from /proc/*/stat.
pub fn descendants(root: u32) -> Vec<u32> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            let Some((_, rest)) = stat.rsplit_once(") ") else {
                continue;
            };
            if let Some(ppid) = rest.split_whitespace().nth(1).and_then(|x| x.parse().ok()) {
                children.entry(ppid).or_default().push(pid);
            }
        }
    }
    let mut out = Vec::new();
    let mut todo = vec![root];
    while let Some(p) = todo.pop() {
        if let Some(c) = children.get(&p) {
            out.extend_from_slice(c);
            todo.extend_from_slice(c);
        }
    }
    out
}

pub fn tree_stat(root: u32) -> TreeStat {
    let (pss, rss) = pss_rss_kib(root);
    let desc = descendants(root);
    let tree_pss = pss + desc.iter().map(|&p| pss_rss_kib(p).0).sum::<u64>();
    TreeStat {
        root_fds: count_dir(&format!("/proc/{root}/fd")),
        root_threads: count_dir(&format!("/proc/{root}/task")),
        root_pss_kib: pss,
        root_rss_kib: rss,
        root_maps: std::fs::read_to_string(format!("/proc/{root}/maps"))
            .map(|m| m.lines().count())
            .unwrap_or(0),
        descendants: desc.len(),
        tree_pss_kib: tree_pss,
    }
}

fn stat_json(s: &TreeStat) -> Value {
    json!({
        "fds": s.root_fds, "threads": s.root_threads, "pss_kib": s.root_pss_kib,
        "rss_kib": s.root_rss_kib, "maps": s.root_maps, "descendants": s.descendants,
        "tree_pss_kib": s.tree_pss_kib,
    })
}

struct Pending {
    i: usize,
    s: Session,
    out: Vec<u8>,
    needle: Vec<u8>,
    since: Instant,
}

/// Rate (sessions/s) over sessions `from..to` of the answer times `t` (sorted, seconds).
fn rate(t: &[f64], from: usize, to: usize) -> f64 {
    if to <= from + 1 || to > t.len() {
        return 0.0;
    }
    let span = t[to - 1] - if from == 0 { 0.0 } else { t[from - 1] };
    if span <= 0.0 {
        0.0
    } else {
        (to - from) as f64 / span
    }
}

pub fn main(args: &[String]) -> i32 {
    let a = match parse(args) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("loadgen shells: {e}\n{USAGE}");
            return 2;
        }
    };
    let nofile = crate::sys::raise_nofile();
    if (nofile as usize) < a.sessions + 64 {
        eprintln!(
            "loadgen shells: {} sessions need more descriptors than the limit ({nofile})",
            a.sessions
        );
        return 2;
    }
    let before = a.agent_pid.map(tree_stat);
    let server_before = a.server_pid.map(pss_rss_kib);
    let start = Instant::now();
    let mut ready_at: Vec<f64> = Vec::with_capacity(a.sessions);
    let mut open: Vec<Session> = Vec::with_capacity(a.sessions);
    let mut pending: Vec<Pending> = Vec::new();
    let mut next = 0usize;
    let mut failure: Option<String> = None;
    let mut last_sweep = Instant::now();
    let mut last_report = Instant::now();
    let per_session_limit = Duration::from_secs(60);
    while (next < a.sessions || !pending.is_empty()) && failure.is_none() {
        if start.elapsed() > a.timeout {
            failure = Some(format!("timeout after {:?}", a.timeout));
            break;
        }
        while pending.len() < a.window && next < a.sessions {
            let i = next;
            next += 1;
            let mut s = match Session::connect(&a.target, a.tenant, a.agent, [0u8; 32]) {
                Ok(s) => s,
                Err(e) => {
                    failure = Some(format!("session {i}: connect: {e}"));
                    break;
                }
            };
            if let Err(e) = s.send(format!("echo READY_$(({i}+0))\n").as_bytes()) {
                failure = Some(format!("session {i}: send: {e}"));
                break;
            }
            pending.push(Pending {
                i,
                s,
                out: Vec::new(),
                needle: format!("READY_{i}\r\n").into_bytes(),
                since: Instant::now(),
            });
        }
        if failure.is_some() {
            break;
        }
        {
            let fds: Vec<_> = pending
                .iter()
                .filter_map(|p| p.s.poll_fd().map(|fd| (fd, libc::POLLIN)))
                .collect();
            let mut rev = vec![0i16; fds.len()];
            let _ = clawterm_poll::wait(&fds, &mut rev, 20);
        }
        let mut k = 0;
        while k < pending.len() {
            let p = &mut pending[k];
            let mut answered = false;
            loop {
                match p.s.try_recv() {
                    Ok(Some(Event::Data(d))) => {
                        p.out.extend_from_slice(&d);
                        if p.out.windows(p.needle.len()).any(|w| w == p.needle) {
                            answered = true;
                        }
                    }
                    Ok(Some(Event::Ended)) => {
                        failure = Some(format!(
                            "session {}: ended before answering; it said {:?}",
                            p.i,
                            String::from_utf8_lossy(&p.out)
                        ));
                        break;
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => break,
                    Err(e) => {
                        failure = Some(format!("session {}: {e}", p.i));
                        break;
                    }
                }
            }
            if failure.is_some() {
                break;
            }
            if answered {
                ready_at.push(start.elapsed().as_secs_f64());
                let p = pending.swap_remove(k);
                open.push(p.s);
                continue;
            }
            if p.since.elapsed() > per_session_limit {
                failure = Some(format!(
                    "session {}: no answer within {per_session_limit:?}; it said {:?}",
                    p.i,
                    String::from_utf8_lossy(&p.out)
                ));
                break;
            }
            k += 1;
        }
        // Keep the answered sessions' connections serviced (keepalives, acknowledgements).
        if last_sweep.elapsed() > Duration::from_secs(2) {
            for s in &mut open {
                while let Ok(Some(_)) = s.try_recv() {}
            }
            last_sweep = Instant::now();
        }
        if last_report.elapsed() > Duration::from_secs(5) {
            eprintln!(
                "[loadgen shells] {} answered, {} waiting, {:.1} s",
                ready_at.len(),
                pending.len(),
                start.elapsed().as_secs_f64()
            );
            last_report = Instant::now();
        }
    }
    let all_s = start.elapsed().as_secs_f64();
    let n = ready_at.len();
    // Let the shells settle (prompts printed, nothing starting) before reading /proc.
    let settle = Instant::now();
    while settle.elapsed() < Duration::from_secs(2) {
        for s in &mut open {
            while let Ok(Some(_)) = s.try_recv() {}
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let after = a.agent_pid.map(tree_stat);
    let server_after = a.server_pid.map(pss_rss_kib);
    let tenth = (n / 10).max(1);
    let per = |x: u64| if n == 0 { 0.0 } else { x as f64 / n as f64 };
    let mut v = json!({
        "tool": "loadgen", "scenario": "shells", "ok": failure.is_none() && n == a.sessions,
        "sessions": a.sessions, "answered": n, "window": a.window,
        "all_answered_s": all_s,
        "rate_overall_per_s": if all_s > 0.0 { n as f64 / all_s } else { 0.0 },
        "rate_first_10pct_per_s": rate(&ready_at, 0, tenth.min(n)),
        "rate_last_10pct_per_s": rate(&ready_at, n.saturating_sub(tenth), n),
        "failure": failure,
    });
    if let (Some(b), Some(x)) = (before, after) {
        v["agent_before"] = stat_json(&b);
        v["agent_after"] = stat_json(&x);
        v["per_session"] = json!({
            "pod_tree_pss_kib": per(x.tree_pss_kib),
            "pod_tree_pss_growth_kib": per(x.tree_pss_kib.saturating_sub(b.tree_pss_kib)),
            "agent_pss_growth_kib": per(x.root_pss_kib.saturating_sub(b.root_pss_kib)),
            "agent_fds": per(x.root_fds.saturating_sub(b.root_fds) as u64),
            "agent_threads": per(x.root_threads.saturating_sub(b.root_threads) as u64),
            "agent_maps": per(x.root_maps.saturating_sub(b.root_maps) as u64),
            "processes": per(x.descendants.saturating_sub(b.descendants) as u64),
        });
    }
    if let (Some(b), Some(x)) = (server_before, server_after) {
        v["server_pss_kib"] = json!({"before": b.0, "after": x.0});
        v["per_session"]["server_pss_growth_kib"] = json!(per(x.0.saturating_sub(b.0)));
    }
    let s = serde_json::to_string_pretty(&v).unwrap_or_default();
    println!("{s}");
    if let Some(p) = &a.json {
        if let Err(e) = std::fs::write(p, format!("{s}\n")) {
            eprintln!("loadgen shells: cannot write {}: {e}", p.display());
        }
    }
    if let Some(f) = v["failure"].as_str() {
        eprintln!("[loadgen shells] FAILED: {f}");
    }
    // The sessions end with this process (their connections close; the pod keeps the shells
    // until the caller stops it).
    drop(open);
    drop(pending);
    if v["ok"].as_bool() == Some(true) {
        0
    } else {
        1
    }
}
