//! The figures of sessions across daemon restarts and live upgrades (issue 14; docs/STATE.md,
//! docs/BENCHMARKS.md "Sessions across daemon restarts and upgrades"). Four parts, each with a
//! fresh `clawtermd` (plaintext, loopback) and its own `claw-agent echo` pod:
//!
//! * **busy upgrade** (`--busy N`, `--upgrades U`): N echo sessions driven by `loadgen echo`,
//!   **open loop at `--busy-rate` messages per second per session** (default 10: every session
//!   has an echo out every 100 ms, so a freeze of 100 ms or more is seen by every session and a
//!   shorter one by a matching share of them), while the daemon is upgraded U times
//!   (`clawtermd --upgrade`, same arguments). Per upgrade: spawn → the new process's
//!   `listening` line, spawn → the old process's exit, and the hand-over's own `took_ms` (new
//!   process) and `frozen_ms` (old process) from their logs. Over the run: loadgen's echo
//!   latency, losses and mismatches, and `session_max_latency_us`, each session's longest wait
//!   for an echo — its p99 over the sessions is the "p99 pause" of the issue's goal. Meanwhile
//!   a prober opens a TCP connection every 2 ms (reset at once) and another a whole session
//!   (CONNECT → ACCEPT → DISCONNECT) every 20 ms: refused or failed connects are counted (goal 0)
//!   and new sessions timed.
//! * **idle upgrade** (`--idle N`): N idle sessions (`loadgen idle`, a KEEPALIVE every 2 s
//!   each) held across U upgrades — all must still be up at the end — plus `--probes` echo
//!   sessions (20 messages/s each) whose per-session longest wait is the pause; same timings
//!   and probers.
//! * **SIGKILL restart** (`--kill N`): N sessions opened by this program (the client library's
//!   sans-IO `ClientCore` over blocking sockets, from 127.0.0.2–9), each sending one DATA
//!   through the echo pod and reading its echo without acknowledging it (so it is pending
//!   output the server must keep: it was journaled before it was written to the socket). Then
//!   SIGKILL, and a new `clawtermd` on the state dir: spawn → `listening` (every session is
//!   restored before it listens; the log's `state dir opened sessions=` is checked), spawn →
//!   every session RESUMEd with its pending output replayed (8 threads, 64 resumes in flight
//!   each), and bytes lost = pending bytes − replayed bytes (duplicates counted apart).
//! * **cost** of the state dir on the per-frame path: closed-loop echo (`loadgen echo --rate 0`,
//!   `--closed-sessions`) through one shard with `--state-dir` and with `--state-dir off`,
//!   alternating, `--reps` each (medians, their ratio, and the median of the per-pair ratios);
//!   and the server's RSS per idle session (`loadgen idle --server-pid`, `--rss-sessions`, default
//!   `--idle`) with and without, alternating, `--reps` each (medians and the difference; also
//!   split into RssAnon / RssFile / RssShmem per session from /proc/PID/status, the journal's
//!   mapped window being shared file memory), and the state dir's allocated bytes with the
//!   sessions open (its files' blocks: on a tmpfs, memory outside the process's RSS).
//!
//! Placement (as bench/run.sh): every `clawtermd` (its shards pinned with `--cpus`) and its echo
//! pod on `--server-cpu` (default 0), loadgen and this program's client threads on
//! `--client-cpu` (default 1); `--no-pin` leaves everything to the scheduler (automatic with
//! one CPU or without `taskset`). The state dirs live under `--state-parent` (default
//! /dev/shm, a tmpfs as in production, if writable; else the temp dir).
//!
//! ```text
//! cargo build --release -p clawterm -p loadgen --bins && cargo build --release -p clawterm-bench --bin state_figures
//! ./target/release/state_figures [--idle 10000] [--busy 2000] [--kill 10000] [--upgrades 3] [--reps 3] [--json FILE]
//! ```
//!
//! Progress on stderr, one JSON object on stdout (and in `--json FILE`). Exit status 1 when
//! something failed functionally (a session lost, an echo lost, a connect refused, bytes of
//! pending output lost, a process that did not start or exit) — never because a figure missed
//! its goal; 2 for bad usage. Every wait is bounded.

use clawterm::proto::FrameType;
use clawterm_client::core::{AckPolicy, ClientCore, CoreEvent, CoreOptions};
use clawterm_testkit as harness;
use harness::{Lines, Proc};
use serde_json::{json, Value};
use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const TENANT: u32 = 7;
const AGENT: u32 = 1;
const TOKEN: [u8; 32] = [0xAB; 32];

const HELP: &str = "\
state_figures: sessions across clawtermd restarts and live upgrades (issue 14)

  state_figures [--idle N] [--busy N] [--kill N] [--upgrades U] [--reps R] [--json FILE]
                [--only busy,idle,kill,cost] [--busy-rate PER_SESSION_PER_S] [--probes N]
                [--closed-sessions N] [--cost-seconds S] [--rss-sessions N] [--shards S]
                [--server-cpu C] [--client-cpu C] [--no-pin] [--state-parent DIR] [--io IO]

  --idle N             idle sessions held across the upgrades (default 10000)
  --busy N             echo sessions driven across the upgrades (default 2000)
  --kill N             sessions with pending output across SIGKILL + restart (default 10000)
  --upgrades U         live upgrades per upgrade figure (default 3)
  --reps R             alternating reps with and without a state dir (default 3)
  --busy-rate R        echo messages per second per busy session, open loop (default 10)
  --probes N           echo probe sessions next to the idle ones, 20 msg/s each (default 50)
  --closed-sessions N  closed-loop echo sessions of the cost figure (default 1000)
  --cost-seconds S     measured seconds of each closed-loop rep (default 5)
  --rss-sessions N     idle sessions of the RSS cost figure (default: --idle)
  --shards S           shards of the upgraded / restarted daemons (default 2; cost: 1)
  --server-cpu C       CPU of clawtermd and its echo pod (default 0)
  --client-cpu C       CPU of loadgen and this program's clients (default 1)
  --no-pin             no CPU pinning
  --state-parent DIR   where the state dirs go (default /dev/shm if writable)
  --io IO              clawtermd --io (default: clawtermd's)
  --json FILE          also write the JSON there

Needs the release clawtermd, claw-agent and loadgen next to this program:
  cargo build --release -p clawterm -p loadgen --bins
Progress on stderr, JSON on stdout. Exit 1 on a functional failure, never on a figure.
Environment: STATE_FIGURES_RUST_LOG sets clawtermd's log filter (e.g. info,clawterm=debug for
the hand-over's time breakdown); STATE_FIGURES_LOGS=DIR keeps each clawtermd's log there.
See docs/BENCHMARKS.md.";

// ---------------------------------------------------------------------------------------------
// Options

#[derive(Clone)]
struct Opts {
    idle: usize,
    busy: usize,
    kill: usize,
    upgrades: usize,
    reps: usize,
    busy_rate: f64,
    probes: usize,
    closed: usize,
    cost_secs: f64,
    rss_sessions: usize,
    shards: usize,
    server_cpu: Option<usize>,
    client_cpu: Option<usize>,
    state_parent: PathBuf,
    io: Option<String>,
    only: Vec<String>,
    json: Option<PathBuf>,
}

fn usage(msg: &str) -> ! {
    eprintln!("state_figures: {msg} (see --help)");
    std::process::exit(2);
}

fn parse_args() -> Opts {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "-h" || a == "--help") {
        println!("{HELP}");
        std::process::exit(0);
    }
    fn num<T: std::str::FromStr>(v: Option<&String>, name: &str) -> T {
        v.and_then(|v| v.parse().ok())
            .unwrap_or_else(|| usage(&format!("{name} needs a number")))
    }
    let ncpu = std::thread::available_parallelism().map_or(1, |n| n.get());
    let taskset = Command::new("taskset")
        .arg("-V")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    let pin = ncpu >= 2 && taskset;
    let shm = PathBuf::from("/dev/shm");
    let shm_ok = std::fs::metadata(&shm).is_ok_and(|m| m.is_dir())
        && std::fs::write(shm.join(format!(".sf-{}", std::process::id())), b"")
            .and_then(|_| std::fs::remove_file(shm.join(format!(".sf-{}", std::process::id()))))
            .is_ok();
    let mut o = Opts {
        idle: 10_000,
        busy: 2_000,
        kill: 10_000,
        upgrades: 3,
        reps: 3,
        busy_rate: 10.0,
        probes: 50,
        closed: 1_000,
        cost_secs: 5.0,
        rss_sessions: 0,
        shards: 2,
        server_cpu: pin.then_some(0),
        client_cpu: pin.then_some(1),
        state_parent: if shm_ok { shm } else { std::env::temp_dir() },
        io: None,
        only: Vec::new(),
        json: None,
    };
    let mut i = 0;
    while i < args.len() {
        let a = args[i].as_str();
        let v = args.get(i + 1);
        let mut took = 2;
        match a {
            "--idle" => o.idle = num(v, a),
            "--busy" => o.busy = num(v, a),
            "--kill" => o.kill = num(v, a),
            "--upgrades" => o.upgrades = num(v, a),
            "--reps" => o.reps = num(v, a),
            "--busy-rate" => o.busy_rate = num(v, a),
            "--probes" => o.probes = num(v, a),
            "--closed-sessions" => o.closed = num(v, a),
            "--cost-seconds" => o.cost_secs = num(v, a),
            "--rss-sessions" => o.rss_sessions = num(v, a),
            "--shards" => o.shards = num(v, a),
            "--server-cpu" => o.server_cpu = Some(num(v, a)),
            "--client-cpu" => o.client_cpu = Some(num(v, a)),
            "--no-pin" => {
                o.server_cpu = None;
                o.client_cpu = None;
                took = 1;
            }
            "--state-parent" => {
                o.state_parent = PathBuf::from(v.unwrap_or_else(|| usage("--state-parent DIR")))
            }
            "--io" => o.io = Some(v.unwrap_or_else(|| usage("--io IO")).clone()),
            "--only" => {
                o.only = v
                    .unwrap_or_else(|| usage("--only LIST"))
                    .split(',')
                    .map(str::to_string)
                    .collect();
                for p in &o.only {
                    if !matches!(p.as_str(), "busy" | "idle" | "kill" | "cost") {
                        usage(&format!("--only: unknown part {p}"));
                    }
                }
            }
            "--json" => o.json = Some(PathBuf::from(v.unwrap_or_else(|| usage("--json FILE")))),
            _ => usage(&format!("unknown argument {a}")),
        }
        i += took;
    }
    if o.rss_sessions == 0 {
        o.rss_sessions = o.idle.max(1);
    }
    if o.reps == 0 || o.shards == 0 || o.busy_rate <= 0.0 || o.cost_secs <= 0.0 {
        usage("--reps, --shards, --busy-rate and --cost-seconds must be positive");
    }
    o
}

fn say(s: impl AsRef<str>) {
    eprintln!("[state_figures] {}", s.as_ref());
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

fn median(v: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// Nearest-rank percentile of unsorted values.
fn pct(v: &[f64], p: f64) -> Option<f64> {
    let mut v = v.to_vec();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let i = ((v.len() as f64 * p).ceil() as usize).saturating_sub(1);
    Some(v[i.min(v.len() - 1)])
}

fn dist_ms(v: &[f64]) -> Value {
    json!({"count": v.len(), "p50": pct(v, 0.5), "p99": pct(v, 0.99), "max": pct(v, 1.0)})
}

/// A command for `prog`, under `taskset -c CPU` when pinned.
fn pinned(cpu: Option<usize>, prog: &Path) -> Command {
    match cpu {
        Some(c) => {
            let mut cmd = Command::new("taskset");
            cmd.arg("-c").arg(c.to_string()).arg(prog);
            cmd
        }
        None => Command::new(prog),
    }
}

/// Problems found on the way (functional failures: the exit status).
static PROBLEMS: Mutex<Vec<String>> = Mutex::new(Vec::new());

fn problem(s: String) {
    say(format!("PROBLEM: {s}"));
    PROBLEMS.lock().unwrap().push(s);
}

// ---------------------------------------------------------------------------------------------
// Processes

/// One figure's world: a directory, the agent's socket dir with a `claw-agent echo` pod, and
/// a state dir.
struct World {
    dir: PathBuf,
    sock: PathBuf,
    state: PathBuf,
    _agent: Proc,
}

impl World {
    fn new(o: &Opts, root: &Path, name: &str) -> World {
        let dir = root.join(name);
        let sock = dir.join("sock");
        std::fs::create_dir_all(&sock).expect("create the socket dir");
        let state = o
            .state_parent
            .join(format!("ct-state-figures-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&state);
        let mut cmd = pinned(o.server_cpu, &harness::bin("claw-agent"));
        cmd.arg("-s")
            .arg(&sock)
            .args(["--tenant", &TENANT.to_string()])
            .args(["--agent", &AGENT.to_string(), "echo"])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        harness::clear_clawterm_env(&mut cmd);
        let mut agent = Proc(cmd.spawn().expect("spawn claw-agent"));
        harness::wait_agent_listening(&mut agent.0);
        World {
            dir,
            sock,
            state,
            _agent: agent,
        }
    }
}

impl Drop for World {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.state);
    }
}

/// A running clawtermd.
struct Daemon {
    proc: Proc,
    lines: Lines,
    addr: SocketAddr,
    /// From spawn to its "listening on tcp" line.
    started_in: Duration,
}

impl Daemon {
    /// `state`: `None` is `--state-dir off`.
    fn start(o: &Opts, w: &World, state: Option<&Path>, shards: usize, upgrade: bool) -> Daemon {
        let mut cmd = pinned(o.server_cpu, &harness::bin("clawtermd"));
        harness::clear_clawterm_env(&mut cmd);
        cmd.args(["--bind", "127.0.0.1", "--port", "0"])
            .args(["--shards", &shards.to_string()])
            .args(["--insecure-plaintext", "--insecure-no-auth"])
            .args(["--admin", "off", "--no-quic"])
            .arg("--socket-dir")
            .arg(&w.sock)
            .arg("--state-dir")
            .arg(state.map_or_else(|| PathBuf::from("off"), Path::to_path_buf))
            // STATE_FIGURES_RUST_LOG: clawtermd's log filter (e.g. `info,clawterm=debug` for
            // the hand-over's time breakdown); STATE_FIGURES_LOGS=DIR keeps each daemon's log.
            .env(
                "RUST_LOG",
                std::env::var("STATE_FIGURES_RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some(c) = o.server_cpu {
            cmd.args(["--cpus", &c.to_string()]);
        }
        if let Some(io) = &o.io {
            cmd.args(["--io", io]);
        }
        if upgrade {
            cmd.arg("--upgrade");
        }
        let t0 = Instant::now();
        let (child, lines, line) = harness::start_server(&mut cmd, "clawtermd");
        let started_in = t0.elapsed();
        Daemon {
            proc: Proc(child),
            lines,
            addr: harness::tcp_addr(&line).expect("clawtermd's listening address"),
            started_in,
        }
    }

    fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// The first log line containing `what`, waiting up to `t` for it.
    fn line(&self, what: &str, t: Duration) -> Option<String> {
        let end = Instant::now() + t;
        loop {
            if let Some(l) = self.lines.lock().unwrap().iter().find(|l| l.contains(what)) {
                return Some(l.clone());
            }
            if Instant::now() >= end {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn tail(&self) -> String {
        let l = self.lines.lock().unwrap();
        l[l.len().saturating_sub(20)..].join("\n")
    }

    fn stop(mut self) {
        harness::stop(&mut self.proc.0);
        if self
            .lines
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("panicked"))
        {
            problem(format!("clawtermd panicked:\n{}", self.tail()));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(dir) = std::env::var("STATE_FIGURES_LOGS") {
            let path = Path::new(&dir).join(format!("clawtermd-{}.log", self.pid()));
            let _ = std::fs::write(path, self.lines.lock().unwrap().join("\n"));
        }
    }
}

fn num_after(line: &str, key: &str) -> Option<f64> {
    harness::word_after(line, key)?.parse().ok()
}

/// A loadgen run in the background (JSON into a file, progress lines collected).
struct Lg {
    child: Child,
    lines: Lines,
    up: std::sync::mpsc::Receiver<Instant>,
    json: PathBuf,
    what: String,
}

impl Lg {
    fn spawn(o: &Opts, w: &World, what: &str, args: &[String]) -> Lg {
        let exe = std::env::current_exe().expect("own path");
        let json = w.dir.join(format!("{what}.json"));
        let mut cmd = pinned(o.client_cpu, &exe.with_file_name("loadgen"));
        cmd.args(args)
            .args(["--tenant", &TENANT.to_string()])
            .args(["--agent", &AGENT.to_string()])
            .arg("--json")
            .arg(&json)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .expect("spawn loadgen (build it: cargo build --release -p loadgen)");
        let (tx, up) = std::sync::mpsc::channel();
        let lines = harness::collect_lines(child.stderr.take().expect("piped"), move |l| {
            if l.contains("sessions up") {
                let _ = tx.send(Instant::now());
            }
        });
        Lg {
            child,
            lines,
            up,
            json,
            what: what.to_string(),
        }
    }

    /// Waits for loadgen's "N of M sessions up" (its sessions are open; the measured phase
    /// starts 0.2 s (echo) or 1 s (idle) later).
    fn wait_up(&mut self, t: Duration) -> Option<Instant> {
        let end = Instant::now() + t;
        loop {
            if let Ok(at) = self.up.recv_timeout(Duration::from_millis(50)) {
                return Some(at);
            }
            if Instant::now() >= end || !matches!(self.child.try_wait(), Ok(None)) {
                problem(format!(
                    "{}: loadgen never opened its sessions: {:?}",
                    self.what,
                    self.lines.lock().unwrap()
                ));
                return None;
            }
        }
    }

    /// Waits (bounded) for the end; loadgen's JSON (Null if none).
    fn finish(mut self, t: Duration) -> Value {
        if harness::wait_timeout(&mut self.child, t).is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
            problem(format!("{}: loadgen did not finish in time", self.what));
        }
        let v: Value = std::fs::read(&self.json)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or(Value::Null);
        if v["ok"] != true {
            problem(format!(
                "{}: loadgen not ok: {} failures {} (last lines {:?})",
                self.what,
                v["problems"],
                v["failures"],
                {
                    let l = self.lines.lock().unwrap();
                    l[l.len().saturating_sub(5)..].to_vec()
                }
            ));
        }
        v
    }
}

fn s(v: impl ToString) -> String {
    v.to_string()
}

// ---------------------------------------------------------------------------------------------
// Blocking sessions over the sans-IO client core

fn src_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, 2 + (i % 8) as u8)
}

fn epoch_ms(epoch: Instant) -> u64 {
    epoch.elapsed().as_millis() as u64
}

fn core_opts(c: &mut ClientCore) {
    c.set_options(CoreOptions {
        acks: AckPolicy::Manual,
        offer_reliable: false,
        data_events: true,
        offer_roam: true,
    });
}

/// One blocking connection of a session.
struct Conn {
    s: TcpStream,
    core: ClientCore,
    buf: Vec<u8>,
}

/// What a read brought: the core's events, plus DATA frames' bytes split into new and
/// repeated (the core's de-duplication), and the SEQ of an ACCEPT.
#[derive(Default)]
struct Got {
    accepted: Option<u32>,
    resumed: bool,
    gap: bool,
    data: Vec<u8>,
    dup_bytes: u64,
    error: Option<String>,
}

impl Conn {
    fn open(i: usize, addr: SocketAddr, core: ClientCore) -> std::io::Result<Conn> {
        let s = harness::connect_from(src_ip(i), addr)?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.set_write_timeout(Some(Duration::from_secs(10)))?;
        Ok(Conn {
            s,
            core,
            buf: vec![0; 4096],
        })
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let out = self.core.take_output();
        if !out.is_empty() {
            self.s.write_all(&out)?;
        }
        Ok(())
    }

    /// [`Conn::read_into`], giving up at `deadline`.
    fn read_by(&mut self, got: &mut Got, epoch: Instant, deadline: Instant) -> std::io::Result<()> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ErrorKind::TimedOut.into());
        }
        self.s.set_read_timeout(Some(left))?;
        self.read_into(got, epoch)
    }

    /// Reads once (blocking, bounded by the socket's timeout) and feeds the core.
    fn read_into(&mut self, got: &mut Got, epoch: Instant) -> std::io::Result<()> {
        let n = self.s.read(&mut self.buf)?;
        if n == 0 {
            return Err(ErrorKind::UnexpectedEof.into());
        }
        let now = epoch_ms(epoch);
        let mut accept_seq = None;
        let mut dup = 0u64;
        let bytes = self.buf[..n].to_vec();
        self.core
            .on_bytes_observed(&bytes, now, |f| {
                if f.ty == FrameType::Accept {
                    accept_seq = Some(f.seq);
                }
                if f.ty == FrameType::Data && !f.fresh {
                    dup += f.payload.len() as u64;
                }
            })
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        got.dup_bytes += dup;
        if accept_seq.is_some() {
            got.accepted = accept_seq;
        }
        while let Some(ev) = self.core.poll_event() {
            match ev {
                CoreEvent::Resumed { gap, .. } => {
                    got.resumed = true;
                    got.gap |= gap;
                }
                CoreEvent::Gap => got.gap = true,
                CoreEvent::Data(d) => got.data.extend_from_slice(&d),
                CoreEvent::Error { code, message } => {
                    got.error = Some(format!("ERROR {code}: {message}"))
                }
                CoreEvent::Ended => got.error = Some("session ended".into()),
                _ => {}
            }
        }
        if let Some(e) = &got.error {
            return Err(std::io::Error::other(e.clone()));
        }
        Ok(())
    }
}

/// A session of the kill figure: what it needs to RESUME, and its pending output.
#[derive(Clone)]
struct Pending {
    i: usize,
    sid: u32,
    token: [u8; 16],
    accept_seq: u32,
    next_seq: u32,
    echo: Vec<u8>,
}

fn kill_payload(i: usize) -> Vec<u8> {
    format!("pending-output-of-session-{i:08};").into_bytes()
}

/// Runs `f` over `items` on `threads` threads (pinned to `cpu`), in windows of `window`:
/// `f` gets one window at a time and returns its results.
fn windows<T: Clone + Send + 'static, R: Send + 'static>(
    items: Vec<T>,
    threads: usize,
    window: usize,
    cpu: Option<usize>,
    f: impl Fn(&[T]) -> Vec<R> + Send + Sync + 'static,
) -> Vec<R> {
    let f = Arc::new(f);
    let per = items.len().div_ceil(threads.max(1)).max(1);
    let chunks: Vec<Vec<T>> = items.chunks(per).map(<[T]>::to_vec).collect();
    let hs: Vec<_> = chunks
        .into_iter()
        .map(|chunk| {
            let f = f.clone();
            std::thread::spawn(move || {
                if let Some(c) = cpu {
                    let _ = harness::pin_thread(c);
                }
                let mut out = Vec::new();
                for w in chunk.chunks(window) {
                    out.extend(f(w));
                }
                out
            })
        })
        .collect();
    hs.into_iter()
        .flat_map(|h| h.join().unwrap_or_default())
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Probers

#[derive(Default)]
struct ProbeCounts {
    tcp_tries: AtomicU64,
    tcp_failed: AtomicU64,
    tcp_during_upgrades: AtomicU64,
    tcp_connect_max_us: AtomicU64,
    sess_tries: AtomicU64,
    sess_failed: AtomicU64,
    sess_during_upgrades: AtomicU64,
}

struct Probers {
    stop: Arc<AtomicBool>,
    upgrading: Arc<AtomicBool>,
    c: Arc<ProbeCounts>,
    sess_ms: Arc<Mutex<Vec<f64>>>,
    first_errors: Arc<Mutex<Vec<String>>>,
    hs: Vec<std::thread::JoinHandle<()>>,
}

impl Probers {
    fn start(addr: SocketAddr, cpu: Option<usize>) -> Probers {
        let stop = Arc::new(AtomicBool::new(false));
        let upgrading = Arc::new(AtomicBool::new(false));
        let c = Arc::new(ProbeCounts::default());
        let sess_ms = Arc::new(Mutex::new(Vec::new()));
        let first_errors = Arc::new(Mutex::new(Vec::new()));
        let mut hs = Vec::new();
        {
            let (stop, upgrading, c, errs) = (
                stop.clone(),
                upgrading.clone(),
                c.clone(),
                first_errors.clone(),
            );
            hs.push(std::thread::spawn(move || {
                if let Some(cpu) = cpu {
                    let _ = harness::pin_thread(cpu);
                }
                let mut next = Instant::now();
                while !stop.load(Ordering::Relaxed) {
                    let during = upgrading.load(Ordering::Relaxed);
                    let t = Instant::now();
                    c.tcp_tries.fetch_add(1, Ordering::Relaxed);
                    if during {
                        c.tcp_during_upgrades.fetch_add(1, Ordering::Relaxed);
                    }
                    match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
                        Ok(s) => {
                            let us = t.elapsed().as_micros() as u64;
                            c.tcp_connect_max_us.fetch_max(us, Ordering::Relaxed);
                            harness::reset(s); // no TIME_WAIT left behind
                        }
                        Err(e) => {
                            c.tcp_failed.fetch_add(1, Ordering::Relaxed);
                            let mut l = errs.lock().unwrap();
                            if l.len() < 5 {
                                l.push(format!("TCP connect: {e}"));
                            }
                        }
                    }
                    next += Duration::from_millis(2);
                    let now = Instant::now();
                    if next > now {
                        std::thread::sleep(next - now);
                    } else {
                        next = now;
                    }
                }
            }));
        }
        {
            let (stop, upgrading, c, sess_ms, errs) = (
                stop.clone(),
                upgrading.clone(),
                c.clone(),
                sess_ms.clone(),
                first_errors.clone(),
            );
            hs.push(std::thread::spawn(move || {
                if let Some(cpu) = cpu {
                    let _ = harness::pin_thread(cpu);
                }
                let epoch = Instant::now();
                let mut k = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    c.sess_tries.fetch_add(1, Ordering::Relaxed);
                    if upgrading.load(Ordering::Relaxed) {
                        c.sess_during_upgrades.fetch_add(1, Ordering::Relaxed);
                    }
                    k += 1;
                    let r = (|| -> std::io::Result<()> {
                        let mut core = ClientCore::new(TENANT, AGENT, TOKEN);
                        core_opts(&mut core);
                        let mut conn = Conn::open(k, addr, core)?;
                        let mut nonce = [0u8; 16];
                        nonce[..8].copy_from_slice(&(k as u64).to_be_bytes());
                        conn.core.start_connect(nonce, epoch_ms(epoch));
                        conn.flush()?;
                        let mut got = Got::default();
                        while got.accepted.is_none() {
                            conn.read_into(&mut got, epoch)?;
                        }
                        sess_ms.lock().unwrap().push(ms(t.elapsed()));
                        conn.core.disconnect(epoch_ms(epoch));
                        conn.flush()
                    })();
                    if let Err(e) = r {
                        c.sess_failed.fetch_add(1, Ordering::Relaxed);
                        let mut l = errs.lock().unwrap();
                        if l.len() < 10 {
                            l.push(format!("new session: {e}"));
                        }
                    }
                    let left = Duration::from_millis(20).saturating_sub(t.elapsed());
                    std::thread::sleep(left);
                }
            }));
        }
        Probers {
            stop,
            upgrading,
            c,
            sess_ms,
            first_errors,
            hs,
        }
    }

    fn finish(self, what: &str) -> Value {
        self.stop.store(true, Ordering::Relaxed);
        for h in self.hs {
            let _ = h.join();
        }
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let c = &self.c;
        let v = json!({
            "tcp_connects": g(&c.tcp_tries),
            "tcp_connects_during_upgrades": g(&c.tcp_during_upgrades),
            "tcp_refused_or_failed": g(&c.tcp_failed),
            "tcp_connect_max_ms": g(&c.tcp_connect_max_us) as f64 / 1000.0,
            "new_sessions": g(&c.sess_tries),
            "new_sessions_during_upgrades": g(&c.sess_during_upgrades),
            "new_sessions_failed": g(&c.sess_failed),
            "new_session_ms": dist_ms(&self.sess_ms.lock().unwrap()),
            "first_errors": *self.first_errors.lock().unwrap(),
        });
        if g(&c.tcp_failed) > 0 || g(&c.sess_failed) > 0 {
            problem(format!(
                "{what}: {} TCP connects and {} new sessions failed: {:?}",
                g(&c.tcp_failed),
                g(&c.sess_failed),
                self.first_errors.lock().unwrap()
            ));
        }
        v
    }
}

// ---------------------------------------------------------------------------------------------
// Upgrades

/// Upgrades `d` `o.upgrades` times, the k-th at `first + k * every`; the daemon serving at the
/// end and each upgrade's figures.
fn upgrade_rounds(
    o: &Opts,
    w: &World,
    mut d: Daemon,
    probers: &Probers,
    first: Instant,
    every: Duration,
) -> (Daemon, Vec<Value>) {
    let mut out = Vec::new();
    for k in 0..o.upgrades {
        let at = first + every * k as u32;
        let now = Instant::now();
        if at > now {
            std::thread::sleep(at - now);
        }
        probers.upgrading.store(true, Ordering::Relaxed);
        let t0 = Instant::now();
        let next = Daemon::start(o, w, Some(&w.state), o.shards, true);
        let listening = next.started_in;
        let exited = harness::wait_timeout(&mut d.proc.0, Duration::from_secs(30));
        let to_exit = t0.elapsed();
        probers.upgrading.store(false, Ordering::Relaxed);
        if exited.is_none() {
            problem(format!(
                "upgrade {k}: the old clawtermd did not exit within 30 s:\n{}",
                d.tail()
            ));
        }
        if next.addr != d.addr {
            problem(format!(
                "upgrade {k}: the new clawtermd listens on {} instead of {}",
                next.addr, d.addr
            ));
        }
        let took = next
            .line("upgrade: took over", Duration::from_secs(2))
            .unwrap_or_default();
        let handed = d
            .line("upgrade: handed over", Duration::from_secs(2))
            .unwrap_or_default();
        if took.is_empty() || handed.is_empty() {
            problem(format!(
                "upgrade {k}: no hand-over in the logs:\nold:\n{}\nnew:\n{}",
                d.tail(),
                next.tail()
            ));
        }
        let fig = json!({
            "start_to_listening_ms": ms(listening),
            "start_to_old_exit_ms": ms(to_exit),
            "took_ms": num_after(&took, "took_ms="),
            "frozen_ms": num_after(&handed, "frozen_ms="),
            "old_took_ms": num_after(&handed, "took_ms="),
            "sessions": num_after(&took, "sessions="),
            "connections": num_after(&took, "connections="),
            "links": num_after(&took, "links="),
            "bytes": num_after(&took, "bytes="),
        });
        say(format!(
            "upgrade {k}: start→old exit {:.1} ms, start→listening {:.1} ms, frozen {} ms, took {} ms, sessions {}",
            ms(to_exit),
            ms(listening),
            fig["frozen_ms"],
            fig["took_ms"],
            fig["sessions"]
        ));
        out.push(fig);
        drop(std::mem::replace(&mut d, next));
    }
    (d, out)
}

fn upgrade_summary(rounds: &[Value]) -> Value {
    let col = |k: &str| -> Vec<f64> { rounds.iter().filter_map(|r| r[k].as_f64()).collect() };
    json!({
        "start_to_old_exit_ms": dist_ms(&col("start_to_old_exit_ms")),
        "start_to_listening_ms": dist_ms(&col("start_to_listening_ms")),
        "frozen_ms": dist_ms(&col("frozen_ms")),
        "took_ms": dist_ms(&col("took_ms")),
    })
}

fn ms_of_us(v: &Value) -> Option<f64> {
    v.as_f64().map(|x| x / 1000.0)
}

// ---------------------------------------------------------------------------------------------
// The figures

fn busy(o: &Opts, root: &Path) -> Value {
    say(format!(
        "busy upgrade: {} echo sessions at {}/s each, {} upgrades",
        o.busy, o.busy_rate, o.upgrades
    ));
    let w = World::new(o, root, "busy");
    let d = Daemon::start(o, &w, Some(&w.state), o.shards, false);
    let addr = d.addr;
    let every = Duration::from_secs(4);
    let secs = 2 + 4 * o.upgrades;
    let rate = o.busy as f64 * o.busy_rate;
    let mut lg = Lg::spawn(
        o,
        &w,
        "busy-echo",
        &[
            s("echo"),
            s("--target"),
            s(addr),
            s("--sessions"),
            s(o.busy),
            s("--rate"),
            s(rate),
            s("--duration"),
            s(secs),
            s("--warmup"),
            s(1),
            s("--ack-delay"),
            s(1000),
        ],
    );
    let Some(up) = lg.wait_up(Duration::from_secs(120)) else {
        let _ = lg.finish(Duration::from_secs(5));
        d.stop();
        return json!({"failed": "loadgen did not start"});
    };
    // The window opens 0.2 s (release) + 1 s (warm-up) after "sessions up".
    let window = (
        up + Duration::from_millis(1200),
        Duration::from_secs(secs as u64),
    );
    let probers = Probers::start(addr, o.client_cpu);
    let (d, rounds) = upgrade_rounds(o, &w, d, &probers, window.0 + Duration::from_secs(1), every);
    let inside = Instant::now() < window.0 + window.1;
    let probes = probers.finish("busy upgrade");
    let v = lg.finish(Duration::from_secs(180));
    d.stop();
    if !inside {
        problem("busy upgrade: the upgrades outlasted loadgen's measured window".into());
    }
    let smax = &v["session_max_latency_us"];
    json!({
        "sessions": o.busy,
        "rate_per_session_per_s": o.busy_rate,
        "rate_total_per_s": rate,
        "mode": "open loop",
        "upgrades": rounds,
        "upgrade": upgrade_summary(&rounds),
        "upgrades_inside_window": inside,
        "loadgen_ok": v["ok"],
        "problems": v["problems"],
        "sent": v["sent"],
        "received_in_window": v["received_in_window"],
        "achieved_rate": v["achieved_rate"],
        "lost": v["lost_in_window"],
        "mismatched": v["mismatched_echoes"],
        "alive_at_end": v["counts"]["alive_at_end"],
        "latency_us": v["latency_us"],
        "session_max_latency_us": smax,
        "pause_p99_ms": ms_of_us(&smax["p99"]),
        "pause_max_ms": ms_of_us(&smax["max"]),
        "probes": probes,
    })
}

fn idle(o: &Opts, root: &Path) -> Value {
    say(format!(
        "idle upgrade: {} idle sessions + {} echo probes, {} upgrades",
        o.idle, o.probes, o.upgrades
    ));
    let w = World::new(o, root, "idle");
    let d = Daemon::start(o, &w, Some(&w.state), o.shards, false);
    let addr = d.addr;
    let every = Duration::from_secs(4);
    let probe_secs = 2 + 4 * o.upgrades;
    // The idle hold covers the probes' start (up to a few s) and their whole window.
    let hold = probe_secs + 8;
    let mut idle_lg = Lg::spawn(
        o,
        &w,
        "idle-idle",
        &[
            s("idle"),
            s("--target"),
            s(addr),
            s("--sessions"),
            s(o.idle),
            s("--duration"),
            s(hold),
            s("--keepalive"),
            s(2),
        ],
    );
    let Some(idle_up) = idle_lg.wait_up(Duration::from_secs(300)) else {
        let _ = idle_lg.finish(Duration::from_secs(5));
        d.stop();
        return json!({"failed": "loadgen idle did not start"});
    };
    let hold_end = idle_up + Duration::from_secs(1) + Duration::from_secs(hold as u64);
    let probe_rate = 20.0;
    let mut probe_lg = Lg::spawn(
        o,
        &w,
        "idle-probes",
        &[
            s("echo"),
            s("--target"),
            s(addr),
            s("--sessions"),
            s(o.probes),
            s("--rate"),
            s(o.probes as f64 * probe_rate),
            s("--duration"),
            s(probe_secs),
            s("--warmup"),
            s(1),
            s("--ack-delay"),
            s(1000),
        ],
    );
    let Some(up) = probe_lg.wait_up(Duration::from_secs(60)) else {
        let _ = probe_lg.finish(Duration::from_secs(5));
        let _ = idle_lg.finish(Duration::from_secs(hold as u64 + 60));
        d.stop();
        return json!({"failed": "loadgen echo probes did not start"});
    };
    let window = (
        up + Duration::from_millis(1200),
        Duration::from_secs(probe_secs as u64),
    );
    let probers = Probers::start(addr, o.client_cpu);
    let (d, rounds) = upgrade_rounds(o, &w, d, &probers, window.0 + Duration::from_secs(1), every);
    let done = Instant::now();
    let inside = done < window.0 + window.1 && done < hold_end;
    let probes = probers.finish("idle upgrade");
    let pv = probe_lg.finish(Duration::from_secs(120));
    let iv = idle_lg.finish(Duration::from_secs(hold as u64 + 120));
    d.stop();
    if !inside {
        problem("idle upgrade: the upgrades outlasted the idle hold or the probes' window".into());
    }
    let alive = iv["sessions_alive_at_end"].as_u64().unwrap_or(0);
    if alive < o.idle as u64 {
        problem(format!(
            "idle upgrade: {alive} of {} idle sessions alive at the end",
            o.idle
        ));
    }
    let smax = &pv["session_max_latency_us"];
    json!({
        "sessions": o.idle,
        "sessions_established": iv["sessions_established"],
        "sessions_alive_at_end": iv["sessions_alive_at_end"],
        "keepalives_sent": iv["keepalives_sent"],
        "idle_ok": iv["ok"],
        "idle_problems": iv["problems"],
        "upgrades": rounds,
        "upgrade": upgrade_summary(&rounds),
        "upgrades_inside_window": inside,
        "probe_sessions": o.probes,
        "probe_rate_per_session_per_s": probe_rate,
        "probes_ok": pv["ok"],
        "probe_problems": pv["problems"],
        "probe_lost": pv["lost_in_window"],
        "probe_mismatched": pv["mismatched_echoes"],
        "probe_latency_us": pv["latency_us"],
        "session_max_latency_us": smax,
        "pause_p99_ms": ms_of_us(&smax["p99"]),
        "pause_max_ms": ms_of_us(&smax["max"]),
        "probes": probes,
    })
}

fn kill(o: &Opts, root: &Path) -> Value {
    let n = o.kill;
    say(format!(
        "kill: {n} sessions with pending output, SIGKILL, restart"
    ));
    let w = World::new(o, root, "kill");
    let mut d = Daemon::start(o, &w, Some(&w.state), o.shards, false);
    let addr = d.addr;
    let epoch = Instant::now();
    let t = Instant::now();
    // Open: CONNECT, one DATA, its echo read but never acknowledged.
    let opened: Vec<Result<(Pending, Conn), String>> = windows(
        (0..n).collect(),
        8,
        64,
        o.client_cpu,
        move |idx: &[usize]| {
            let mut conns: Vec<(usize, Result<Conn, String>)> = idx
                .iter()
                .map(|&i| {
                    let r = (|| {
                        let mut core = ClientCore::new(TENANT, AGENT, TOKEN);
                        core_opts(&mut core);
                        let mut c = Conn::open(i, addr, core)?;
                        let mut nonce = [0u8; 16];
                        nonce[..8].copy_from_slice(&(i as u64).to_be_bytes());
                        c.core.start_connect(nonce, epoch_ms(epoch));
                        c.flush()?;
                        Ok(c)
                    })();
                    (i, r.map_err(|e: std::io::Error| format!("connect: {e}")))
                })
                .collect();
            // The whole window is answered within 20 s or its stragglers fail.
            let deadline = Instant::now() + Duration::from_secs(20);
            let mut accepted = Vec::new();
            for (i, c) in conns.iter_mut() {
                let Ok(conn) = c else {
                    accepted.push(None);
                    continue;
                };
                let mut got = Got::default();
                let r = (|| {
                    while got.accepted.is_none() {
                        conn.read_by(&mut got, epoch, deadline)?;
                    }
                    conn.core.send_data(&kill_payload(*i), epoch_ms(epoch));
                    conn.flush()
                })();
                match r {
                    Ok(()) => accepted.push(got.accepted),
                    Err(e) => {
                        *c = Err(format!("CONNECT: {e}"));
                        accepted.push(None);
                    }
                }
            }
            conns
                .into_iter()
                .zip(accepted)
                .map(|((i, c), acc)| {
                    let mut conn = c?;
                    let want = kill_payload(i).len();
                    let mut got = Got::default();
                    while got.data.len() < want {
                        conn.read_by(&mut got, epoch, deadline)
                            .map_err(|e| format!("echo: {e}"))?;
                    }
                    Ok((
                        Pending {
                            i,
                            sid: conn.core.session_id(),
                            token: conn.core.resume_token(),
                            accept_seq: acc.unwrap_or(0),
                            next_seq: conn.core.next_seq(),
                            echo: got.data,
                        },
                        conn,
                    ))
                })
                .collect()
        },
    );
    let open_s = t.elapsed().as_secs_f64();
    let mut pending = Vec::new();
    let mut conns = Vec::new();
    let mut open_failed = 0;
    for r in opened {
        match r {
            Ok((p, c)) => {
                pending.push(p);
                conns.push(c);
            }
            Err(e) => {
                if open_failed == 0 {
                    say(format!("kill: first failure opening a session: {e}"));
                }
                open_failed += 1;
            }
        }
    }
    if open_failed > 0 {
        problem(format!("kill: {open_failed} of {n} sessions did not open"));
    }
    let expected: u64 = pending.iter().map(|p| p.echo.len() as u64).sum();
    say(format!(
        "kill: {} sessions open in {open_s:.1} s, {expected} bytes of pending output; SIGKILL",
        pending.len()
    ));
    harness::signal(d.pid(), libc::SIGKILL);
    if harness::wait_timeout(&mut d.proc.0, Duration::from_secs(10)).is_none() {
        problem("kill: clawtermd did not die of SIGKILL".into());
    }
    drop(conns);
    let t0 = Instant::now();
    let next = Daemon::start(o, &w, Some(&w.state), o.shards, false);
    let listening = next.started_in;
    let opened_line = next
        .line("state dir opened", Duration::from_secs(1))
        .unwrap_or_default();
    let restored = num_after(&opened_line, "sessions=");
    let fold_ms = num_after(&opened_line, "took_ms=");
    if restored.is_none_or(|r| (r as usize) < pending.len()) {
        problem(format!(
            "kill: the new clawtermd restored {restored:?} sessions, not {}: {opened_line}",
            pending.len()
        ));
    }
    // RESUME every session; each must get exactly its pending output again.
    let addr = next.addr;
    let results: Vec<Result<(Conn, Got, f64), String>> = windows(
        pending.clone(),
        8,
        64,
        o.client_cpu,
        move |ps: &[Pending]| {
            let started: Vec<(Instant, Result<Conn, String>)> = ps
                .iter()
                .map(|p| {
                    let t = Instant::now();
                    let r = (|| {
                        let mut core = ClientCore::for_resume(
                            TENANT,
                            AGENT,
                            p.sid,
                            p.token,
                            p.accept_seq,
                            p.next_seq,
                        );
                        core_opts(&mut core);
                        let mut c = Conn::open(p.i, addr, core)?;
                        c.core.start_resume(epoch_ms(epoch));
                        c.flush()?;
                        Ok(c)
                    })();
                    (t, r.map_err(|e: std::io::Error| format!("connect: {e}")))
                })
                .collect();
            let deadline = Instant::now() + Duration::from_secs(20);
            started
                .into_iter()
                .zip(ps)
                .map(|((t, c), p)| {
                    let mut conn = c?;
                    let mut got = Got::default();
                    while !got.resumed || got.data.len() < p.echo.len() {
                        conn.read_by(&mut got, epoch, deadline)
                            .map_err(|e| format!("session {}: {e}", p.i))?;
                    }
                    Ok((conn, got, ms(t.elapsed())))
                })
                .collect()
        },
    );
    let all_resumed = t0.elapsed();
    let (mut replayed, mut dup, mut gaps, mut failed, mut wrong) = (0u64, 0u64, 0u64, 0u64, 0u64);
    let mut resume_ms = Vec::new();
    let mut keep = Vec::new();
    for (r, p) in results.into_iter().zip(&pending) {
        match r {
            Ok((conn, got, t)) => {
                resume_ms.push(t);
                dup += got.dup_bytes;
                gaps += u64::from(got.gap);
                let common = got
                    .data
                    .iter()
                    .zip(&p.echo)
                    .take_while(|(a, b)| a == b)
                    .count();
                replayed += common as u64;
                if got.data != p.echo {
                    wrong += 1;
                    dup += (got.data.len() - common) as u64;
                }
                keep.push(conn);
            }
            Err(e) => {
                if failed == 0 {
                    say(format!("kill: first RESUME failure: {e}"));
                }
                failed += 1;
            }
        }
    }
    say(format!(
        "kill: start→listening {:.1} ms, start→all {} RESUMEd {:.1} ms; {} of {expected} bytes replayed",
        ms(listening),
        keep.len(),
        ms(all_resumed),
        replayed
    ));
    drop(keep);
    next.stop();
    let lost = expected.saturating_sub(replayed);
    if failed > 0 || lost > 0 || dup > 0 || gaps > 0 || wrong > 0 {
        problem(format!(
            "kill: {failed} resumes failed, {lost} bytes lost, {dup} bytes repeated or extra, {gaps} gaps, {wrong} sessions with other output"
        ));
    }
    json!({
        "sessions": n,
        "sessions_opened": pending.len(),
        "open_seconds": open_s,
        "restored": restored,
        "fold_ms": fold_ms,
        "start_to_listening_ms": ms(listening),
        "start_to_all_resumed_ms": ms(all_resumed),
        "resumed": pending.len() as u64 - failed,
        "resume_failures": failed,
        "resume_ms": dist_ms(&resume_ms),
        "resume_threads": 8,
        "resumes_in_flight": 8 * 64,
        "pending_bytes_expected": expected,
        "pending_bytes_replayed": replayed,
        "bytes_lost": lost,
        "bytes_duplicated": dup,
        "sessions_with_gap": gaps,
        "sessions_with_other_output": wrong,
    })
}

/// [RssAnon, RssFile, RssShmem] of a process, in bytes.
fn rss_parts(pid: u32) -> Option<[f64; 3]> {
    let k = |key: &str| harness::status_kib(pid, key).map(|v| v as f64 * 1024.0);
    Some([k("RssAnon:")?, k("RssFile:")?, k("RssShmem:")?])
}

/// Allocated bytes of the files in `dir` (a tmpfs's memory).
fn dir_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.blocks() * 512)
                .sum()
        })
        .unwrap_or(0)
}

fn cost(o: &Opts, root: &Path) -> Value {
    say(format!(
        "cost: closed-loop echo ({} sessions, {} s) and RSS per idle session ({} sessions), with and without a state dir, {} reps each",
        o.closed, o.cost_secs, o.rss_sessions, o.reps
    ));
    let mut rates: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    let mut p50: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    let mut pair_ratios = Vec::new();
    for rep in 0..o.reps {
        // Alternate which goes first, so a drift in the machine's speed hits both alike.
        let order: [usize; 2] = if rep % 2 == 0 { [0, 1] } else { [1, 0] };
        let mut this = [None, None];
        for m in order {
            let w = World::new(o, root, &format!("cost-echo-{rep}-{m}"));
            let d = Daemon::start(o, &w, (m == 1).then_some(w.state.as_path()), 1, false);
            let lg = Lg::spawn(
                o,
                &w,
                "echo-closed",
                &[
                    s("echo"),
                    s("--target"),
                    s(d.addr),
                    s("--sessions"),
                    s(o.closed),
                    s("--rate"),
                    s(0),
                    s("--duration"),
                    s(o.cost_secs),
                    s("--warmup"),
                    s(1),
                    s("--server-pid"),
                    s(d.pid()),
                ],
            );
            let v = lg.finish(Duration::from_secs_f64(120.0 + 3.0 * o.cost_secs));
            d.stop();
            let r = v["achieved_rate"].as_f64();
            say(format!(
                "cost rep {rep}: closed-loop echo {} a state dir: {:?}/s",
                if m == 1 { "with" } else { "without" },
                r
            ));
            if let Some(r) = r {
                rates[m].push(r);
            }
            if let Some(x) = v["latency_us"]["p50"].as_f64() {
                p50[m].push(x);
            }
            this[m] = r;
        }
        if let [Some(off), Some(on)] = this {
            if off > 0.0 {
                pair_ratios.push(on / off);
            }
        }
    }
    let mut rss: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    // Per session, from /proc/PID/status: [RssAnon, RssFile, RssShmem] (the journal's mapped
    // window is shared memory of a tmpfs file, or a file's page cache).
    let mut parts: [Vec<[f64; 3]>; 2] = [Vec::new(), Vec::new()];
    let mut dir_bytes_open: Vec<f64> = Vec::new();
    for rep in 0..o.reps {
        let order: [usize; 2] = if rep % 2 == 0 { [0, 1] } else { [1, 0] };
        for m in order {
            let w = World::new(o, root, &format!("cost-rss-{rep}-{m}"));
            let d = Daemon::start(o, &w, (m == 1).then_some(w.state.as_path()), 1, false);
            std::thread::sleep(Duration::from_millis(200));
            let p0 = rss_parts(d.pid());
            let mut lg = Lg::spawn(
                o,
                &w,
                "idle-rss",
                &[
                    s("idle"),
                    s("--target"),
                    s(d.addr),
                    s("--sessions"),
                    s(o.rss_sessions),
                    s("--duration"),
                    s(2),
                    s("--server-pid"),
                    s(d.pid()),
                ],
            );
            if lg.wait_up(Duration::from_secs(300)).is_some() {
                // loadgen reads the RSS 1 s after "sessions up"; these a little before.
                std::thread::sleep(Duration::from_millis(700));
                if let (Some(a), Some(b)) = (p0, rss_parts(d.pid())) {
                    let n = o.rss_sessions as f64;
                    parts[m].push([0, 1, 2].map(|k| (b[k] - a[k]) / n));
                }
                if m == 1 {
                    dir_bytes_open.push(dir_bytes(&w.state) as f64);
                }
            }
            let v = lg.finish(Duration::from_secs(300));
            d.stop();
            let b = v["server_rss_bytes_per_session"].as_f64();
            say(format!(
                "cost rep {rep}: server RSS per idle session {} a state dir: {b:?} B",
                if m == 1 { "with" } else { "without" }
            ));
            if let Some(b) = b {
                rss[m].push(b);
            }
        }
    }
    let (off, on) = (median(&rates[0]), median(&rates[1]));
    let (roff, ron) = (median(&rss[0]), median(&rss[1]));
    let part = |m: usize| {
        let col = |k: usize| median(&parts[m].iter().map(|p| p[k]).collect::<Vec<_>>());
        json!({"anon": col(0), "file": col(1), "shmem": col(2)})
    };
    json!({
        "echo_closed_loop": {
            "sessions": o.closed, "seconds": o.cost_secs, "shards": 1,
            "rate_without": rates[0], "rate_with": rates[1],
            "median_without": off, "median_with": on,
            "ratio_of_medians": match (on, off) { (Some(a), Some(b)) if b > 0.0 => Some(a / b), _ => None },
            "pair_ratios": pair_ratios,
            "median_pair_ratio": median(&pair_ratios),
            "latency_p50_us_without": p50[0], "latency_p50_us_with": p50[1],
        },
        "rss_per_idle_session": {
            "sessions": o.rss_sessions, "shards": 1,
            "bytes_without": rss[0], "bytes_with": rss[1],
            "median_without": roff, "median_with": ron,
            "difference": match (ron, roff) { (Some(a), Some(b)) => Some(a - b), _ => None },
            "rss_parts_per_session": {"without": part(0), "with": part(1)},
            "state_dir_allocated_bytes": median(&dir_bytes_open),
        },
    })
}

fn main() {
    let o = parse_args();
    harness::raise_nofile();
    // SAFETY: a plain prctl; no memory is involved.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong) };
    if let Some(c) = o.client_cpu {
        // The main thread (and the threads it spawns unless they pin themselves) on the client CPU.
        let _ = harness::pin_thread(c);
    }
    let root = std::env::temp_dir().join(format!("ct-state-figures-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).expect("create the work dir");
    let want = |p: &str| o.only.is_empty() || o.only.iter().any(|x| x == p);
    let t = Instant::now();
    let mut out = serde_json::Map::new();
    out.insert("tool".into(), json!("state_figures"));
    out.insert(
        "params".into(),
        json!({
            "idle": o.idle, "busy": o.busy, "kill": o.kill, "upgrades": o.upgrades,
            "reps": o.reps, "busy_rate_per_session": o.busy_rate, "probes": o.probes,
            "closed_sessions": o.closed, "cost_seconds": o.cost_secs,
            "rss_sessions": o.rss_sessions, "shards": o.shards, "io": o.io,
            "state_parent": o.state_parent.display().to_string(),
        }),
    );
    out.insert(
        "placement".into(),
        json!(match (o.server_cpu, o.client_cpu) {
            (Some(s), Some(c)) => format!(
                "clawtermd (--cpus {s}) and claw-agent echo on CPU {s}, loadgen and the probing clients on CPU {c}"
            ),
            _ => "unpinned".to_string(),
        }),
    );
    if want("busy") && o.busy > 0 && o.upgrades > 0 {
        out.insert("busy_upgrade".into(), busy(&o, &root));
    }
    if want("idle") && o.idle > 0 && o.upgrades > 0 {
        out.insert("idle_upgrade".into(), idle(&o, &root));
    }
    if want("kill") && o.kill > 0 {
        out.insert("kill_restart".into(), kill(&o, &root));
    }
    if want("cost") {
        out.insert("cost".into(), cost(&o, &root));
    }
    let problems = PROBLEMS.lock().unwrap().clone();
    out.insert("ok".into(), json!(problems.is_empty()));
    out.insert("problems".into(), json!(problems));
    out.insert("seconds".into(), json!(t.elapsed().as_secs()));
    let v = Value::Object(out);
    summary(&v);
    let text = serde_json::to_string_pretty(&v).unwrap_or_default();
    println!("{text}");
    if let Some(p) = &o.json {
        if let Err(e) = std::fs::write(p, &text) {
            eprintln!("state_figures: cannot write {}: {e}", p.display());
        }
    }
    let _ = std::fs::remove_dir_all(&root);
    std::process::exit(i32::from(!problems.is_empty()));
}

/// The figures against the issue's goals, on stderr.
fn summary(v: &Value) {
    let f = |x: &Value| x.as_f64().map_or("–".to_string(), |x| format!("{x:.1}"));
    for (k, name) in [("busy_upgrade", "busy"), ("idle_upgrade", "idle")] {
        let u = &v[k];
        if u.is_null() {
            continue;
        }
        say(format!(
            "{name} upgrade, {} sessions: start→old exit max {} ms (frozen max {} ms); pause p99 {} ms (goal ≤ 50), max {} ms; refused connects {} (goal 0)",
            u["sessions"],
            f(&u["upgrade"]["start_to_old_exit_ms"]["max"]),
            f(&u["upgrade"]["frozen_ms"]["max"]),
            f(&u["pause_p99_ms"]),
            f(&u["pause_max_ms"]),
            u["probes"]["tcp_refused_or_failed"]
        ));
    }
    let k = &v["kill_restart"];
    if !k.is_null() {
        say(format!(
            "SIGKILL restart, {} sessions: start→listening {} ms, start→all resumed {} ms (goal ≤ 1000); bytes lost {} (goal 0)",
            k["sessions"],
            f(&k["start_to_listening_ms"]),
            f(&k["start_to_all_resumed_ms"]),
            k["bytes_lost"]
        ));
    }
    let c = &v["cost"];
    if !c.is_null() {
        say(format!(
            "state dir cost: closed-loop echo with/without {} (median pair ratio {}; goal ≥ 0.95); RSS per idle session {} B more (goal ≤ 64)",
            c["echo_closed_loop"]["ratio_of_medians"]
                .as_f64()
                .map_or("–".into(), |x| format!("{x:.3}")),
            c["echo_closed_loop"]["median_pair_ratio"]
                .as_f64()
                .map_or("–".into(), |x| format!("{x:.3}")),
            f(&c["rss_per_idle_session"]["difference"])
        ));
    }
    if v["ok"] != true {
        say(format!("FAILED: {}", v["problems"]));
    }
}
