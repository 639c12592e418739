//! `loadgen roam`: sessions under echo traffic while their node is drained to other nodes of a
//! ClawRoam cluster (docs/CLUSTER.md). Sessions are the client library's (`Session`: RELIABLE,
//! following ROAM — or, for `--no-roam-share` of them, not following it, so they are relayed),
//! spread over `--threads` threads that each poll their sessions' sockets.
//!
//! ```text
//! loadgen roam --target HOST:PORT --admin HOST:PORT [--to NODE] [--sessions N] [--rate R]
//!     [--no-roam-share F] [--idle] [--warmup SECS] [--settle SECS] [--threads T] [--window W]
//!     [--json FILE]
//!     [--tenant T --agent A --token HEX]
//! ```
//!
//! Each echo session keeps one 24-byte echo in flight (`--rate 0`, closed loop) or sends
//! `--rate` per second. After `--warmup`, the node at `--admin` is drained (`POST /v1/drain`,
//! to `--to` or spread by the node, `--window` moves at a time), and per session the **gap** — its longest wait for an echo
//! while the drain ran and `--settle` seconds after — is recorded: it spans freeze, hand-over,
//! ROAM, reconnect, RESUME and the resent input's echo. With `--idle` nothing is echoed during
//! the drain (a drain figure); each session then proves it still works with one echo at the
//! end. Output: one JSON object (stdout and `--json`): sessions, moved, failed moves, drain
//! time, gap p50/p99/max (ms), echoes, broken streams (an echo missing, doubled or out of order),
//! clients that ended at another node, and errors. Exit 0 when every session moved and every
//! echo came back exactly once, in order; 1 otherwise; 2 for bad usage.

use clawterm_client::{Backoff, Event, Options, Session, Transport};
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

struct Args {
    target: String,
    admin: String,
    to: Option<String>,
    sessions: usize,
    rate: f64,
    no_roam_share: f64,
    idle: bool,
    warmup: f64,
    settle: f64,
    threads: usize,
    window: usize,
    json: Option<String>,
    tenant: u32,
    agent: u32,
    token: [u8; 32],
}

fn parse(args: &[String]) -> Result<Args, String> {
    let mut a = Args {
        target: String::new(),
        admin: String::new(),
        to: None,
        sessions: 1000,
        rate: 0.0,
        no_roam_share: 0.0,
        idle: false,
        warmup: 2.0,
        settle: 2.0,
        threads: 8,
        window: 256,
        json: None,
        tenant: 1,
        agent: 1,
        token: [0xAB; 32],
    };
    let mut it = args.iter();
    while let Some(k) = it.next() {
        let mut v = || it.next().cloned().ok_or(format!("{k} needs a value"));
        let num = |s: String| s.parse::<f64>().map_err(|e| format!("{k}: {e}"));
        match k.as_str() {
            "--target" => a.target = v()?,
            "--admin" => a.admin = v()?,
            "--to" => a.to = Some(v()?),
            "--sessions" => a.sessions = num(v()?)? as usize,
            "--rate" => a.rate = num(v()?)?,
            "--no-roam-share" => a.no_roam_share = num(v()?)?.clamp(0.0, 1.0),
            "--idle" => a.idle = true,
            "--warmup" => a.warmup = num(v()?)?,
            "--settle" => a.settle = num(v()?)?,
            "--threads" => a.threads = (num(v()?)? as usize).max(1),
            "--window" => a.window = (num(v()?)? as usize).max(1),
            "--json" => a.json = Some(v()?),
            "--tenant" => a.tenant = num(v()?)? as u32,
            "--agent" => a.agent = num(v()?)? as u32,
            "--token" => {
                let h = v()?;
                hex::decode_to_slice(&h, &mut a.token)
                    .map_err(|_| format!("--token must be 64 hex digits, got {h}"))?;
            }
            _ => return Err(format!("unknown argument {k}")),
        }
    }
    if a.target.is_empty() || a.admin.is_empty() {
        return Err("--target HOST:PORT and --admin HOST:PORT are required".into());
    }
    Ok(a)
}

/// One thread's sessions.
struct Fleet {
    sessions: Vec<Session>,
    sent: Vec<u64>,
    got: Vec<Vec<u8>>,
    want: Vec<Vec<u8>>,
    in_flight: Vec<Option<Instant>>,
    next_send: Vec<Instant>,
    gap: Vec<Duration>,
    errors: Vec<String>,
    echoes: u64,
    /// Per phase (0: before the drain, 1: during it, 2: after it): echoes completed and the sum
    /// of their round trips (closed loop), for the direct-versus-relayed comparison.
    phase_echoes: [u64; 3],
    phase_rtt: [Duration; 3],
}

impl Fleet {
    fn new() -> Fleet {
        Fleet {
            sessions: Vec::new(),
            sent: Vec::new(),
            got: Vec::new(),
            want: Vec::new(),
            in_flight: Vec::new(),
            next_send: Vec::new(),
            gap: Vec::new(),
            errors: Vec::new(),
            echoes: 0,
            phase_echoes: [0; 3],
            phase_rtt: [Duration::ZERO; 3],
        }
    }

    fn push(&mut self, s: Session) {
        self.sessions.push(s);
        self.sent.push(0);
        self.got.push(Vec::new());
        self.want.push(Vec::new());
        self.in_flight.push(None);
        self.next_send.push(Instant::now());
        self.gap.push(Duration::ZERO);
    }

    /// Echoes (when `echo` says so) and reads until `stop`; gaps count while `measuring`.
    fn run(
        &mut self,
        rate: f64,
        echo: &AtomicBool,
        stop: &AtomicBool,
        measuring: &AtomicBool,
        phase: &std::sync::atomic::AtomicUsize,
    ) {
        let every = (rate > 0.0).then(|| Duration::from_secs_f64(1.0 / rate));
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
            // SAFETY: `fds` is a valid, exclusively borrowed array of `fds.len()` pollfd
            // entries for the duration of the call.
            unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 2) };
            let now = Instant::now();
            for i in 0..self.sessions.len() {
                let due = match every {
                    None => self.in_flight[i].is_none(),
                    Some(_) => now >= self.next_send[i],
                };
                if echo.load(Ordering::Relaxed) && due {
                    let line = format!(
                        "{:08x} {:>12}\n",
                        self.sessions[i].session_id(),
                        self.sent[i]
                    );
                    self.sent[i] += 1;
                    if let Some(e) = every {
                        self.next_send[i] = now + e;
                    }
                    match self.sessions[i].send(line.as_bytes()) {
                        Ok(()) => {
                            self.want[i].extend_from_slice(line.as_bytes());
                            self.in_flight[i].get_or_insert(now);
                        }
                        Err(e) => self.errors.push(format!("send: {e}")),
                    }
                }
                loop {
                    match self.sessions[i].try_recv() {
                        Ok(Some(Event::Data(d))) => {
                            self.got[i].extend_from_slice(&d);
                            self.echoes += d.iter().filter(|&&b| b == b'\n').count() as u64;
                            if self.got[i].len() >= self.want[i].len() {
                                if let Some(t) = self.in_flight[i].take() {
                                    let rtt = t.elapsed();
                                    if measuring.load(Ordering::Relaxed) {
                                        self.gap[i] = self.gap[i].max(rtt);
                                    }
                                    let p = phase.load(Ordering::Relaxed).min(2);
                                    self.phase_echoes[p] += 1;
                                    self.phase_rtt[p] += rtt;
                                }
                            } else if every.is_some() {
                                // Open loop: the oldest echo outstanding is the one timed.
                                self.in_flight[i] = Some(Instant::now());
                            }
                        }
                        Ok(Some(_)) => {}
                        Ok(None) => break,
                        Err(e) => {
                            self.errors.push(format!(
                                "session {:08x}: {e}",
                                self.sessions[i].session_id()
                            ));
                            break;
                        }
                    }
                }
            }
        }
    }
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

/// `POST /v1/drain` to the admin endpoint; progress to stderr; the summary line.
fn drain(admin: &str, to: Option<&str>, window: usize) -> Result<Value, String> {
    let mut s = std::net::TcpStream::connect(admin).map_err(|e| format!("admin {admin}: {e}"))?;
    let _ = s.set_read_timeout(Some(Duration::from_secs(120)));
    let path = match to {
        Some(t) => format!("/v1/drain?window={window}&to={t}"),
        None => format!("/v1/drain?window={window}"),
    };
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| format!("admin {admin}: {e}"))?;
    let mut body = String::new();
    s.read_to_string(&mut body)
        .map_err(|e| format!("admin {admin}: {e}"))?;
    let mut summary = None;
    for l in body.lines() {
        if let Ok(v) = serde_json::from_str::<Value>(l) {
            if v["progress"].as_bool() == Some(true) {
                eprintln!(
                    "  drain: {}/{} moved, {} failed",
                    v["moved"], v["total"], v["failed"]
                );
            }
            if v["summary"].as_bool() == Some(true) || v.get("error").is_some() {
                summary = Some(v);
            }
        }
    }
    summary.ok_or_else(|| format!("no drain summary in: {}", body.lines().next().unwrap_or("")))
}

/// `loadgen roam ...`; the exit status.
pub fn main(args: &[String]) -> i32 {
    let a = match parse(args) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("loadgen roam: {e}");
            return 2;
        }
    };
    let opts = |follow_roam| Options {
        backoff: Backoff::new(Duration::from_millis(2), Duration::from_millis(200)),
        connect_timeout: Duration::from_secs(5),
        handshake_timeout: Duration::from_secs(10),
        transport: Transport::Plaintext,
        follow_roam,
        ..Options::default()
    };
    let no_roam = (a.sessions as f64 * a.no_roam_share).round() as usize;
    eprintln!(
        "roam: opening {} sessions at {} ({no_roam} without ROAM)",
        a.sessions, a.target
    );
    let mut fleets: Vec<Fleet> = (0..a.threads).map(|_| Fleet::new()).collect();
    let t_open = Instant::now();
    for i in 0..a.sessions {
        match Session::connect_with(&a.target, a.tenant, a.agent, a.token, opts(i >= no_roam)) {
            Ok(s) => fleets[i % a.threads].push(s),
            Err(e) => {
                eprintln!("loadgen roam: session {i}: {e}");
                return 1;
            }
        }
        if i % 1000 == 999 {
            eprintln!("  {} open", i + 1);
        }
    }
    let open_s = t_open.elapsed().as_secs_f64();
    let echo = Arc::new(AtomicBool::new(!a.idle));
    let stop = Arc::new(AtomicBool::new(false));
    let measuring = Arc::new(AtomicBool::new(false));
    let phase = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let handles: Vec<_> = fleets
        .into_iter()
        .map(|mut f| {
            let (e, s, m, ph, rate) = (
                echo.clone(),
                stop.clone(),
                measuring.clone(),
                phase.clone(),
                a.rate,
            );
            std::thread::spawn(move || {
                f.run(rate, &e, &s, &m, &ph);
                f
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs_f64(a.warmup));
    phase.store(1, Ordering::Relaxed);
    measuring.store(true, Ordering::Relaxed);
    eprintln!(
        "roam: draining {} ({})",
        a.admin,
        a.to.as_deref().unwrap_or("spread")
    );
    let t0 = Instant::now();
    let summary = drain(&a.admin, a.to.as_deref(), a.window);
    let drain_s = t0.elapsed().as_secs_f64();
    phase.store(2, Ordering::Relaxed);
    let t_after = Instant::now();
    if a.idle {
        // Every client proves it followed (or is relayed): one echo each.
        echo.store(true, Ordering::Relaxed);
    }
    std::thread::sleep(Duration::from_secs_f64(a.settle));
    let after_s = t_after.elapsed().as_secs_f64();
    echo.store(false, Ordering::Relaxed);
    // The last echoes come back.
    std::thread::sleep(Duration::from_millis(500));
    measuring.store(false, Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    let (mut gaps, mut broken, mut moved_clients, mut errors, mut echoes) =
        (Vec::new(), 0usize, 0usize, Vec::new(), 0u64);
    let (mut pe, mut pr) = ([0u64; 3], [Duration::ZERO; 3]);
    for h in handles {
        let Ok(f) = h.join() else {
            errors.push("a driver thread panicked".to_string());
            continue;
        };
        for i in 0..f.sessions.len() {
            gaps.push(f.gap[i].as_secs_f64() * 1000.0);
            if f.got[i] != f.want[i] {
                broken += 1;
                if errors.len() < 5 {
                    errors.push(format!(
                        "session {:08x}: got {} bytes, want {}",
                        f.sessions[i].session_id(),
                        f.got[i].len(),
                        f.want[i].len()
                    ));
                }
            }
            if f.sessions[i].endpoint() != a.target {
                moved_clients += 1;
            }
        }
        echoes += f.echoes;
        for p in 0..3 {
            pe[p] += f.phase_echoes[p];
            pr[p] += f.phase_rtt[p];
        }
        errors.extend(f.errors);
    }
    let (summary, drain_err) = match summary {
        Ok(v) => (v, None),
        Err(e) => (json!({}), Some(e)),
    };
    let moved = summary["moved"].as_u64().unwrap_or(0);
    let ok = drain_err.is_none()
        && moved == a.sessions as u64
        && broken == 0
        && errors.is_empty()
        && echoes > 0;
    let out = json!({
        "scenario": "roam",
        "sessions": a.sessions,
        "no_roam_sessions": no_roam,
        "open_s": open_s,
        "moved": moved,
        "failed_moves": summary["failed"],
        "first_failures": summary["failures"].as_array().map(|v| v.iter().take(5).cloned().collect::<Vec<_>>()),
        "drain_s": drain_s,
        "drain_node_s": summary["elapsed_s"],
        "moves_per_s": summary["per_second"],
        "gap_ms": { "p50": pct(&mut gaps.clone(), 0.5), "p99": pct(&mut gaps.clone(), 0.99), "max": pct(&mut gaps, 1.0) },
        "echoes": echoes,
        // Closed loop: echoes per second and mean round trip before the drain (direct) and
        // after it (followed clients direct at the target; the others relayed).
        "before": {
            "echoes_per_s": pe[0] as f64 / a.warmup.max(1e-9),
            "rtt_mean_us": if pe[0] > 0 { pr[0].as_micros() as f64 / pe[0] as f64 } else { 0.0 },
        },
        "after": {
            "echoes_per_s": pe[2] as f64 / after_s.max(1e-9),
            "rtt_mean_us": if pe[2] > 0 { pr[2].as_micros() as f64 / pe[2] as f64 } else { 0.0 },
        },
        "broken_streams": broken,
        "clients_at_another_node": moved_clients,
        "errors": errors.len(),
        "first_errors": errors.iter().take(5).collect::<Vec<_>>(),
        "drain_error": drain_err,
        "ok": ok,
    });
    println!("{out}");
    if let Some(p) = &a.json {
        if let Err(e) = std::fs::write(p, format!("{out}\n")) {
            eprintln!("loadgen roam: {p}: {e}");
        }
    }
    i32::from(!ok)
}
