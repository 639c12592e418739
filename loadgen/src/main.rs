//! `loadgen`: load generator for `clawtermd` (see docs/BENCHMARKS.md).
//!
//! ```text
//! loadgen SCENARIO --target HOST:PORT [--sessions N] [--duration SECS] [--json FILE]
//!     [--tenant T --agent A --token HEX] [--rate R] [--workers W] [--server-pid PID]
//!     [--inflight N] [--warmup SECS] [--keepalive SECS] [--reconnect same-port|new-port]
//!     [--shards-hint S] [--ack-delay MS] [--spin-us US] [--transport tcp|tls|quic|ws | --tls | --quic]
//!     [--ca PEM | --pin SHA256] [--server-name NAME] [--resume-rate R] [--open-rate R]
//! loadgen raw-echo-server [--bind ADDR:PORT] [--duration SECS]
//! loadgen self-signed-cert DIR
//! ```
//!
//! Scenarios: `idle`, `connect`, `echo`, `resume`, `resume-cross`, `raw-echo` (the echo
//! scenario against `loadgen raw-echo-server`, no protocol). The process is a coordinator: it
//! opens one warm-up session, then re-executes itself as `--worker I` children (each with at
//! most ~18,000 sockets, so the per-process open-file limit is not the ceiling), releases them
//! together, merges their results (counts, failures, HDR histograms) and prints one JSON
//! summary on stdout (and to `--json FILE`). Progress goes to stderr once a second.
//! Exit status: 0 when the scenario worked functionally (no errors, every session
//! established), 1 when it did not, 2 for bad usage.

mod bulk;
mod quic;
mod raw_server;
mod roam;
mod shells;
mod sys;
mod worker;
mod ws;

use clawterm_client::core::{ClientCore, CoreEvent, CoreOptions};
use hdrhistogram::Histogram;
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, SocketAddrV4, TcpStream, ToSocketAddrs};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const MAX_PER_WORKER: usize = 18_000;

/// How sessions reach the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// Plaintext TCP (`clawtermd --insecure-plaintext`).
    Tcp,
    /// TLS 1.3 over TCP.
    Tls,
    /// QUIC (UDP), one connection and one stream per session.
    Quic,
    /// WebSocket (plaintext, `clawtermd --ws-port`, `/ws`): one masked binary message per
    /// write, as the browser page sends them.
    Ws,
}

impl Transport {
    fn name(self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::Tls => "tls",
            Transport::Quic => "quic",
            Transport::Ws => "ws",
        }
    }
}

const USAGE: &str = "usage: loadgen SCENARIO --target HOST:PORT [--sessions N] [--duration SECS] \
[--json FILE] [--tenant T --agent A --token HEX] [--rate R] [--workers W] [--server-pid PID] \
[--inflight N] [--warmup SECS] [--keepalive SECS] [--reconnect same-port|new-port] \
[--shards-hint S] [--ack-delay MS] [--spin-us US] [--transport tcp|tls|quic|ws | --tls | --quic] [--ca PEM | --pin SHA256] \
[--server-name NAME] [--resume-rate R] [--open-rate R] [--bulk B] [--bulk-bytes N]
  SCENARIO: idle | connect | echo | resume | resume-cross | raw-echo | bulk | roam
    roam: loadgen roam --target HOST:PORT --admin HOST:PORT [--to NODE] [--sessions N]
          [--no-roam-share F] [--idle] [--rate R]: sessions under echo traffic (the client
          library, following ROAM) while the node at --admin is drained (loadgen/src/roam.rs)
    bulk: B sessions keep 4 messages of N bytes (default 60000) in flight through the echo
          agent while --sessions probes time a 32-byte echo every 20 ms (plaintext TCP)
       loadgen raw-echo-server [--bind ADDR:PORT] [--duration SECS]
       loadgen self-signed-cert DIR";

#[derive(Clone, Debug)]
pub struct Opts {
    pub scenario: String,
    pub target: SocketAddrV4,
    pub sessions: usize,
    pub duration: f64,
    pub json: Option<PathBuf>,
    pub tenant: u32,
    pub agent: u32,
    pub token: [u8; 32],
    token_hex: Option<String>,
    /// Echo: total DATA frames per second across sessions; 0 = closed loop.
    pub rate: f64,
    pub workers: Option<usize>,
    pub server_pid: Option<u32>,
    pub inflight: usize,
    pub warmup: f64,
    pub keepalive: f64,
    pub same_port: bool,
    pub shards_hint: u32,
    pub worker: Option<usize>,
    pub bind: String,
    /// Echo: delay before a standalone cumulative ACK (ms); 0 = one ACK per read batch, as
    /// the clawterm client does.
    pub ack_delay_ms: f64,
    /// Open-loop echo: poll without sleeping when the next send is due within this (µs).
    pub spin_us: u64,
    pub transport: Transport,
    /// Resume: new resumes per second (0 = a burst, `--inflight` at a time).
    pub resume_rate: f64,
    /// Opening sessions: new connections per second (0 = as fast as `--inflight` allows).
    pub open_rate: f64,
    /// PEM file of the certificates to trust (TLS and QUIC); neither this nor `pin`: the
    /// system roots.
    pub ca: Option<PathBuf>,
    /// SHA-256 of the server's certificate (DER) to accept instead of a chain.
    pub pin: Option<[u8; 32]>,
    /// Name to verify the server's certificate against (default: the target's address).
    pub server_name: Option<String>,
    /// Bulk: sessions that keep bulk output flowing (`--sessions` are the probes).
    pub bulk: usize,
    /// Bulk: bytes of each bulk message.
    pub bulk_bytes: usize,
}

fn parse_args(args: &[String]) -> Result<Opts, String> {
    let mut it = args.iter();
    let scenario = it.next().ok_or("missing SCENARIO")?.clone();
    let known = [
        "idle",
        "connect",
        "echo",
        "resume",
        "resume-cross",
        "raw-echo",
        "raw-echo-server",
        "bulk",
    ];
    if scenario == "-h" || scenario == "--help" {
        println!("{USAGE}");
        std::process::exit(0);
    }
    if !known.contains(&scenario.as_str()) {
        return Err(format!("unknown scenario `{scenario}`"));
    }
    let mut o = Opts {
        scenario,
        target: "127.0.0.1:7220".parse().unwrap(),
        sessions: 1000,
        duration: 10.0,
        json: None,
        tenant: 1,
        agent: 1,
        token: [0; 32],
        token_hex: None,
        rate: 10_000.0,
        workers: None,
        server_pid: None,
        inflight: 256,
        warmup: 1.0,
        keepalive: 20.0,
        same_port: false,
        shards_hint: 1,
        worker: None,
        bind: "127.0.0.1:0".into(),
        ack_delay_ms: 0.0,
        spin_us: 200,
        transport: Transport::Tcp,
        resume_rate: 0.0,
        open_rate: 0.0,
        ca: None,
        server_name: None,
        pin: None,
        bulk: 2,
        bulk_bytes: 60_000,
    };
    let mut have_target = false;
    while let Some(a) = it.next() {
        let mut val = || {
            it.next()
                .cloned()
                .ok_or_else(|| format!("{a} needs a value"))
        };
        match a.as_str() {
            "--target" => {
                let v = val()?;
                let addr = v
                    .to_socket_addrs()
                    .map_err(|e| format!("--target {v}: {e}"))?
                    .find_map(|a| match a {
                        SocketAddr::V4(a) => Some(a),
                        _ => None,
                    })
                    .ok_or_else(|| format!("--target {v}: no IPv4 address"))?;
                o.target = addr;
                have_target = true;
            }
            "--sessions" => o.sessions = num(&val()?)?,
            "--duration" => o.duration = secs(&val()?)?,
            "--warmup" => o.warmup = secs0(&val()?)?,
            "--keepalive" => o.keepalive = secs(&val()?)?,
            "--json" => o.json = Some(PathBuf::from(val()?)),
            "--tenant" => o.tenant = num(&val()?)?,
            "--agent" => o.agent = num(&val()?)?,
            "--token" => {
                let v = val()?;
                o.token = parse_token(&v)?;
                o.token_hex = Some(v);
            }
            "--rate" => o.rate = rate("--rate", &val()?)?,
            "--workers" => o.workers = Some(num::<usize>(&val()?)?.max(1)),
            "--server-pid" => o.server_pid = Some(num(&val()?)?),
            "--inflight" => o.inflight = num::<usize>(&val()?)?.max(1),
            "--reconnect" => {
                o.same_port = match val()?.as_str() {
                    "same-port" => true,
                    "new-port" => false,
                    v => return Err(format!("--reconnect: `{v}` is not same-port or new-port")),
                }
            }
            "--shards-hint" => {
                let s: u32 = num(&val()?)?;
                if s == 0 || !s.is_power_of_two() {
                    return Err(format!("--shards-hint {s}: must be a power of two"));
                }
                o.shards_hint = s;
            }
            "--worker" => o.worker = Some(num(&val()?)?),
            "--ack-delay" => {
                let v = val()?;
                o.ack_delay_ms = v
                    .parse::<f64>()
                    .ok()
                    .filter(|r| r.is_finite() && (0.0..=10_000.0).contains(r))
                    .ok_or(format!(
                        "--ack-delay: `{v}` is not a number of ms in [0, 10000]"
                    ))?;
            }
            "--spin-us" => o.spin_us = num(&val()?)?,
            "--transport" => {
                o.transport = match val()?.as_str() {
                    "tcp" => Transport::Tcp,
                    "tls" => Transport::Tls,
                    "quic" => Transport::Quic,
                    "ws" => Transport::Ws,
                    v => return Err(format!("--transport: `{v}` is not tcp, tls, quic or ws")),
                }
            }
            // Shorthands, as the `clawterm` client spells them.
            "--quic" => o.transport = Transport::Quic,
            "--tls" => o.transport = Transport::Tls,
            "--ca" => o.ca = Some(PathBuf::from(val()?)),
            "--pin" => {
                let v = val()?;
                o.pin = Some(clawterm_client::transport::parse_pin(&v).ok_or_else(|| {
                    format!("--pin: `{v}` is not the 64-hex-digit SHA-256 of a certificate")
                })?)
            }
            "--open-rate" => o.open_rate = rate("--open-rate", &val()?)?,
            "--resume-rate" => o.resume_rate = rate("--resume-rate", &val()?)?,
            "--server-name" => o.server_name = Some(val()?),
            "--bulk" => o.bulk = num(&val()?)?,
            "--bulk-bytes" => o.bulk_bytes = num::<usize>(&val()?)?.clamp(1, 1 << 20),
            "--bind" => o.bind = val()?,
            other => return Err(format!("unknown argument `{other}`")),
        }
    }
    if !have_target && o.scenario != "raw-echo-server" {
        return Err("--target HOST:PORT is required".into());
    }
    if o.transport != Transport::Tcp && (o.scenario == "raw-echo" || o.scenario == "bulk") {
        return Err(format!("{} is plaintext TCP only", o.scenario));
    }
    if o.transport == Transport::Quic && o.scenario == "resume-cross" {
        // Over QUIC the shard a connection lands on follows its connection ids, not its
        // source port, so the port-borrowing construction does not apply (`resume` works).
        return Err(
            "resume-cross is TCP/TLS only (over QUIC the shard follows the connection id, \
             not the source port); use `resume` over QUIC"
                .into(),
        );
    }
    Ok(o)
}

fn num<T: std::str::FromStr>(s: &str) -> Result<T, String> {
    s.parse()
        .map_err(|_| format!("`{s}` is not a non-negative integer"))
}

/// A rate per second: finite and >= 0 (0: closed loop / unpaced).
fn rate(flag: &str, s: &str) -> Result<f64, String> {
    s.parse::<f64>()
        .ok()
        .filter(|r| r.is_finite() && *r >= 0.0)
        .ok_or(format!("{flag}: `{s}` is not a rate >= 0"))
}

fn secs(s: &str) -> Result<f64, String> {
    s.parse::<f64>()
        .ok()
        .filter(|d| d.is_finite() && *d > 0.0 && *d <= 86_400.0)
        .ok_or(format!("`{s}` is not a number of seconds in (0, 86400]"))
}

fn secs0(s: &str) -> Result<f64, String> {
    if s == "0" {
        return Ok(0.0);
    }
    secs(s)
}

fn parse_token(s: &str) -> Result<[u8; 32], String> {
    let mut t = [0u8; 32];
    hex::decode_to_slice(s.trim(), &mut t)
        .map_err(|_| "--token must be 64 hex digits (32 bytes)".to_string())?;
    Ok(t)
}

macro_rules! progress {
    ($o:expr, $($t:tt)*) => {{ eprintln!("[loadgen {}] {}", $o.scenario, format!($($t)*)); }};
}

// ------------------------------------------------------------------------------------------
// Warm-up session (blocking): proves the server and the agent pod are there.

/// A blocking byte stream to the server (the warm-up session).
pub trait Rw: Read + Write {}
impl<T: Read + Write> Rw for T {}

/// The TLS client configuration for `--transport tls|quic` (trusting `--ca`, `--pin`, or the
/// system roots).
pub fn tls_client(
    o: &Opts,
) -> Result<
    (
        std::sync::Arc<rustls::ClientConfig>,
        rustls::pki_types::ServerName<'static>,
    ),
    String,
> {
    let trust = clawterm_client::transport::TlsTrust {
        ca: o.ca.clone(),
        pin: o.pin,
        server_name: o.server_name.clone(),
    };
    clawterm_client::transport::client_config(&trust, &o.target.to_string())
        .map_err(|e| format!("TLS configuration: {e}"))
}

/// Opens a blocking stream over the chosen transport; `Err((retry, why))`.
fn open_stream(o: &Opts) -> Result<Box<dyn Rw>, (bool, String)> {
    let t = Duration::from_secs(5);
    let tcp = || {
        let s = TcpStream::connect_timeout(&SocketAddr::V4(o.target), t)
            .map_err(|e| (true, format!("connect {}: {e}", o.target)))?;
        s.set_read_timeout(Some(t)).ok();
        let _ = s.set_nodelay(true);
        Ok::<_, (bool, String)>(s)
    };
    match o.transport {
        Transport::Tcp => Ok(Box::new(tcp()?)),
        Transport::Ws => Ok(Box::new(
            ws::WsStream::open(tcp()?, &o.target.to_string())
                .map_err(|e| (true, format!("WebSocket {}: {e}", o.target)))?,
        )),
        Transport::Tls => {
            let (cfg, name) = tls_client(o).map_err(|e| (false, e))?;
            let c = rustls::ClientConnection::new(cfg, name)
                .map_err(|e| (false, format!("TLS: {e}")))?;
            Ok(Box::new(rustls::StreamOwned::new(c, tcp()?)))
        }
        Transport::Quic => {
            let (cfg, name) = tls_client(o).map_err(|e| (false, e))?;
            let host = match &name {
                rustls::pki_types::ServerName::IpAddress(ip) => {
                    std::net::IpAddr::from(*ip).to_string()
                }
                rustls::pki_types::ServerName::DnsName(d) => d.as_ref().to_string(),
                _ => o.target.ip().to_string(),
            };
            let mut q = clawterm_client::quic::QuicStream::connect(
                SocketAddr::V4(o.target),
                &host,
                cfg,
                None,
                None,
                t,
            )
            .map_err(|e| (true, format!("QUIC {}: {e}", o.target)))?;
            q.set_read_timeout(Some(t));
            Ok(Box::new(q))
        }
    }
}

/// The warm-up session: its stream and protocol state.
type Warm = (Box<dyn Rw>, ClientCore);

fn warm_up(o: &Opts) -> Result<Option<Warm>, String> {
    let t = Instant::now();
    let mut last = String::new();
    while t.elapsed() < Duration::from_secs(15) {
        if o.scenario == "raw-echo" {
            return match TcpStream::connect(o.target) {
                Ok(_) => Ok(None),
                Err(e) => Err(format!("cannot connect to {}: {e}", o.target)),
            };
        }
        match warm_once(o) {
            Ok(x) => return Ok(Some(x)),
            Err((retry, e)) => {
                last = e;
                if !retry {
                    break;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(format!("warm-up session failed: {last}"))
}

fn warm_once(o: &Opts) -> Result<Warm, (bool, String)> {
    let mut s = open_stream(o)?;
    let mut core = ClientCore::new(o.tenant, o.agent, o.token);
    core.set_options(CoreOptions {
        offer_reliable: false,
        ..CoreOptions::default()
    });
    core.start_connect([0xAA; 16], 0);
    s.write_all(&core.take_output())
        .map_err(|e| (true, format!("write: {e}")))?;
    let _ = s.flush();
    let mut chunk = [0u8; 4096];
    loop {
        let n = s
            .read(&mut chunk)
            .map_err(|e| (true, format!("read: {e}")))?;
        if n == 0 {
            return Err((true, "EOF before ACCEPT".into()));
        }
        core.on_bytes(&chunk[..n], 0)
            .map_err(|e| (false, format!("undecodable reply: {e}")))?;
        if let Some(ev) = core.poll_event() {
            return match ev {
                CoreEvent::Accepted { .. } => Ok((s, core)),
                // NO_AGENT right after start: the pod may not be discovered yet.
                CoreEvent::Error { code, message } => {
                    Err((code == 5, format!("ERROR code {code} `{message}`")))
                }
                e => Err((false, format!("unexpected {e:?}"))),
            };
        }
    }
}

// ------------------------------------------------------------------------------------------
// Workers

struct WorkerProc {
    child: Child,
    stdin: Option<std::process::ChildStdin>,
}

fn worker_args(o: &Opts, idx: usize, sessions: usize, rate: f64, workers: usize) -> Vec<String> {
    let mut a = vec![
        o.scenario.clone(),
        "--target".into(),
        o.target.to_string(),
        "--sessions".into(),
        sessions.to_string(),
        "--duration".into(),
        o.duration.to_string(),
        "--tenant".into(),
        o.tenant.to_string(),
        "--agent".into(),
        o.agent.to_string(),
        "--rate".into(),
        rate.to_string(),
        "--inflight".into(),
        o.inflight.to_string(),
        "--warmup".into(),
        o.warmup.to_string(),
        "--keepalive".into(),
        o.keepalive.to_string(),
        "--reconnect".into(),
        if o.same_port { "same-port" } else { "new-port" }.into(),
        "--shards-hint".into(),
        o.shards_hint.to_string(),
        "--worker".into(),
        idx.to_string(),
        "--ack-delay".into(),
        o.ack_delay_ms.to_string(),
        "--spin-us".into(),
        o.spin_us.to_string(),
        "--transport".into(),
        o.transport.name().into(),
        "--resume-rate".into(),
        (o.resume_rate / workers as f64).to_string(),
        "--open-rate".into(),
        (o.open_rate / workers as f64).to_string(),
    ];
    if let Some(ca) = &o.ca {
        a.push("--ca".into());
        a.push(ca.display().to_string());
    }
    if let Some(p) = &o.pin {
        a.push("--pin".into());
        a.push(hex::encode(p));
    }
    if let Some(n) = &o.server_name {
        a.push("--server-name".into());
        a.push(n.clone());
    }
    if let Some(t) = &o.token_hex {
        a.push("--token".into());
        a.push(t.clone());
    }
    a
}

enum Msg {
    Line(usize, String),
    Eof(usize),
}

#[derive(Default, Clone)]
struct Prog {
    up: u64,
    failed: u64,
    done: u64,
}

fn pct_json(h: &Histogram<u64>) -> Value {
    if h.is_empty() {
        return json!({"count": 0});
    }
    json!({
        "count": h.len(),
        "p50": h.value_at_quantile(0.50),
        "p90": h.value_at_quantile(0.90),
        "p99": h.value_at_quantile(0.99),
        "p999": h.value_at_quantile(0.999),
        "max": h.max(),
        "mean": (h.mean() * 10.0).round() / 10.0,
    })
}

fn coordinate(o: &Opts) -> i32 {
    let nofile = sys::raise_nofile();
    let workers = o
        .workers
        .unwrap_or_else(|| o.sessions.div_ceil(MAX_PER_WORKER))
        .max(1);
    let mut problems: Vec<String> = Vec::new();
    let started = Instant::now();
    progress!(
        o,
        "target {}, {} sessions, {} worker process(es), open-file limit {nofile} per process",
        o.target,
        o.sessions,
        workers
    );
    let warm = match warm_up(o) {
        Ok(w) => w,
        Err(e) => {
            progress!(o, "FAILED: {e}");
            let v = json!({"tool": "loadgen", "scenario": o.scenario, "ok": false,
                "problems": [e], "target": o.target.to_string()});
            emit(o, &v);
            return 1;
        }
    };
    std::thread::sleep(Duration::from_millis(200));
    let rss_before = o.server_pid.and_then(sys::vm_rss);

    // Start the workers.
    let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("/proc/self/exe"));
    let (tx, rx) = mpsc::channel::<Msg>();
    let mut procs = Vec::new();
    for w in 0..workers {
        let share = o.sessions / workers + usize::from(w < o.sessions % workers);
        let rate = o.rate / workers as f64;
        let mut cmd = Command::new(&exe);
        cmd.args(worker_args(o, w, share, rate, workers))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        // SAFETY: only an async-signal-safe prctl between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                problems.push(format!("cannot start worker {w}: {e}"));
                break;
            }
        };
        let out = child.stdout.take().unwrap();
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(Msg::Line(w, line)).is_err() {
                    return;
                }
            }
            let _ = tx.send(Msg::Eof(w));
        });
        let stdin = child.stdin.take();
        procs.push(WorkerProc { child, stdin });
    }
    drop(tx);
    let n = procs.len();
    let mut prog = vec![Prog::default(); n];
    let mut opened: Vec<Option<Value>> = vec![None; n];
    let mut results: Vec<Option<Value>> = vec![None; n];
    let mut eof = vec![false; n];
    let mut go_at: Option<Instant> = None;
    let mut went = false;
    let mut rss_after = None;
    let mut srv_cpu0 = None;
    let mut cpus0 = Vec::new();
    let mut go_time = None;
    let bound = Duration::from_secs_f64(
        180.0 + o.sessions as f64 / 50.0 + 3.0 * (o.duration + o.warmup) + 10.0,
    );
    let mut last_print = Instant::now();
    let mut last_done = 0u64;
    let mut aborted = false;
    while problems.is_empty() && results.iter().any(|r| r.is_none()) {
        if started.elapsed() > bound {
            problems.push(format!(
                "workers did not finish within {:.0} s",
                bound.as_secs_f64()
            ));
            aborted = true;
            break;
        }
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(Msg::Line(w, line)) => {
                let Ok(v) = serde_json::from_str::<Value>(&line) else {
                    eprintln!("[loadgen worker {w}] {line}");
                    continue;
                };
                match v["t"].as_str() {
                    Some("progress") => {
                        prog[w] = Prog {
                            up: v["up"].as_u64().unwrap_or(0),
                            failed: v["failed"].as_u64().unwrap_or(0),
                            done: v["done"].as_u64().unwrap_or(0),
                        }
                    }
                    Some("opened") => {
                        prog[w].up = v["established"].as_u64().unwrap_or(0);
                        opened[w] = Some(v);
                    }
                    Some("result") => results[w] = Some(v),
                    _ => {}
                }
            }
            Ok(Msg::Eof(w)) => {
                eof[w] = true;
                if results[w].is_none() {
                    let st = procs[w]
                        .child
                        .wait()
                        .map(|s| s.to_string())
                        .unwrap_or_default();
                    problems.push(format!("worker {w} exited without a result ({st})"));
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
        // Barrier: once every worker has opened its sessions, settle 1 s, read RSS, release.
        if !went && go_at.is_none() && opened.iter().all(|x| x.is_some()) {
            let settle = if o.scenario == "idle" { 1000 } else { 200 };
            go_at = Some(Instant::now() + Duration::from_millis(settle));
            let est: u64 = opened
                .iter()
                .map(|x| x.as_ref().unwrap()["established"].as_u64().unwrap_or(0))
                .sum();
            if o.scenario != "connect" {
                progress!(o, "{est} of {} sessions up", o.sessions);
            }
        }
        if !went && go_at.is_some_and(|t| Instant::now() >= t) {
            rss_after = o.server_pid.and_then(sys::vm_rss);
            srv_cpu0 = o.server_pid.and_then(sys::proc_cpu_s);
            cpus0 = sys::cpu_ticks();
            go_time = Some(Instant::now());
            for p in procs.iter_mut() {
                if let Some(s) = p.stdin.as_mut() {
                    let _ = s.write_all(b"go\n");
                    let _ = s.flush();
                }
            }
            went = true;
        }
        if last_print.elapsed() >= Duration::from_secs(1) {
            let dt = last_print.elapsed().as_secs_f64();
            last_print = Instant::now();
            let up: u64 = prog.iter().map(|p| p.up).sum();
            let failed: u64 = prog.iter().map(|p| p.failed).sum();
            let done: u64 = prog.iter().map(|p| p.done).sum();
            let what = match o.scenario.as_str() {
                "connect" => "sessions opened+closed",
                "echo" | "raw-echo" => "echoes measured",
                "resume" | "resume-cross" => "resumes replayed",
                _ => "up",
            };
            let rate = if o.scenario == "idle" {
                String::new()
            } else {
                format!(" ({:.0}/s)", done.saturating_sub(last_done) as f64 / dt)
            };
            progress!(
                o,
                "t={:>4.0}s up={up} failed={failed} {what}={done}{rate}",
                started.elapsed().as_secs_f64()
            );
            last_done = done;
        }
    }
    let srv_cpu1 = o.server_pid.and_then(sys::proc_cpu_s);
    let cpus = sys::cpu_usage(&cpus0, &sys::cpu_ticks());
    let run_secs = go_time.map(|t| t.elapsed().as_secs_f64()).unwrap_or(0.0);
    let rss_end = o.server_pid.and_then(sys::vm_rss);
    for p in procs.iter_mut() {
        p.stdin.take();
        if aborted || !problems.is_empty() {
            let _ = p.child.kill();
        }
        let _ = p.child.wait();
    }
    if let Some((mut s, mut core)) = warm {
        core.disconnect(0);
        let _ = s.write_all(&core.take_output());
        let _ = s.flush();
    }

    // Merge.
    let mut counts: BTreeMap<String, u64> = BTreeMap::new();
    let mut failures: BTreeMap<String, u64> = BTreeMap::new();
    let mut other: BTreeMap<String, u64> = BTreeMap::new();
    let mut hists: BTreeMap<String, Histogram<u64>> = BTreeMap::new();
    let mut open_s: f64 = 0.0;
    for (w, r) in results.iter().enumerate() {
        let Some(r) = r else { continue };
        if let Some(e) = r["error"].as_str() {
            problems.push(format!("worker {w}: {e}"));
        }
        for (dst, key) in [(&mut counts, "counts"), (&mut failures, "failures")] {
            if let Some(m) = r[key].as_object() {
                for (k, v) in m {
                    *dst.entry(k.clone()).or_insert(0) += v.as_u64().unwrap_or(0);
                }
            }
        }
        if let Some(m) = r["other_frames"].as_object() {
            for (k, v) in m {
                *other.entry(k.clone()).or_insert(0) += v.as_u64().unwrap_or(0);
            }
        }
        if let Some(m) = r["hists"].as_object() {
            for (k, v) in m {
                let h = hists.entry(k.clone()).or_insert_with(worker::new_hist);
                for pair in v.as_array().into_iter().flatten() {
                    let (val, cnt) = (pair[0].as_u64().unwrap_or(1), pair[1].as_u64().unwrap_or(0));
                    h.saturating_record_n(val.max(1), cnt);
                }
            }
        }
        if let Some(x) = opened[w].as_ref().and_then(|v| v["open_seconds"].as_f64()) {
            open_s = open_s.max(x);
        }
    }
    let measured_ms: u64 = results
        .iter()
        .flatten()
        .filter_map(|r| r["counts"]["measured_ms"].as_u64())
        .max()
        .unwrap_or(0);
    let c = |k: &str| counts.get(k).copied().unwrap_or(0);
    let h = |k: &str| hists.get(k).map(pct_json).unwrap_or(json!({"count": 0}));
    let established = c("established");
    let mut v = Map::new();
    v.insert("tool".into(), json!("loadgen"));
    v.insert("scenario".into(), json!(o.scenario));
    v.insert("target".into(), json!(o.target.to_string()));
    v.insert("transport".into(), json!(o.transport.name()));
    v.insert(
        "params".into(),
        json!({
            "sessions": o.sessions, "duration_s": o.duration, "rate": o.rate,
            "workers": workers, "inflight": o.inflight, "warmup_s": o.warmup,
            "keepalive_s": o.keepalive, "reconnect": if o.same_port {"same-port"} else {"new-port"},
            "shards_hint": o.shards_hint, "payload_bytes": worker::PAYLOAD_LEN,
            "ack_delay_ms": o.ack_delay_ms, "spin_us": o.spin_us,
            "resume_rate": o.resume_rate,
            "open_rate": o.open_rate,
            "resume_mode": if o.resume_rate > 0.0 {"paced"} else {"burst"},
            "tenant": o.tenant, "agent": o.agent,
        }),
    );
    if !failures.is_empty() {
        let total: u64 = failures.values().sum();
        problems.push(format!("{total} session failures (see `failures`)"));
    }
    let sc = o.scenario.as_str();
    if sc != "connect" {
        v.insert("sessions_requested".into(), json!(o.sessions));
        v.insert("sessions_established".into(), json!(established));
        v.insert("open_seconds".into(), json!(open_s));
        if open_s > 0.0 {
            v.insert(
                "open_sessions_per_second".into(),
                json!((established as f64 / open_s).round()),
            );
        }
        if (established as usize) < o.sessions {
            problems.push(format!(
                "only {established} of {} sessions established",
                o.sessions
            ));
        }
    }
    v.insert("handshake_us".into(), h("handshake_us"));
    let srv_cpu = match (srv_cpu0, srv_cpu1) {
        (Some(a), Some(b)) if run_secs > 0.0 => Some((b - a) / run_secs),
        _ => None,
    };
    match sc {
        "idle" => {
            let alive = c("alive_at_end");
            v.insert("sessions_alive_at_end".into(), json!(alive));
            v.insert("hold_seconds".into(), json!(c("hold_ms") as f64 / 1000.0));
            v.insert("keepalives_sent".into(), json!(c("keepalives_sent")));
            if alive < established {
                problems.push(format!("{} sessions died while idle", established - alive));
            }
            if let (Some(b), Some(a)) = (rss_before, rss_after) {
                v.insert("server_rss_before_bytes".into(), json!(b));
                v.insert("server_rss_after_bytes".into(), json!(a));
                v.insert("server_rss_end_bytes".into(), json!(rss_end));
                v.insert(
                    "server_rss_bytes_per_session".into(),
                    json!(((a as f64 - b as f64) / established.max(1) as f64).round()),
                );
            }
        }
        "connect" => {
            let secs = measured_ms as f64 / 1000.0;
            v.insert("sessions_completed".into(), json!(established));
            v.insert("closed_cleanly".into(), json!(c("closed_cleanly")));
            v.insert("measured_seconds".into(), json!(secs));
            v.insert(
                "sessions_per_second".into(),
                json!((established as f64 / secs.max(1e-9)).round()),
            );
            if established == 0 {
                problems.push("no session was established".into());
            }
        }
        "echo" | "raw-echo" => {
            let secs = measured_ms as f64 / 1000.0;
            let got = c("received_in_window");
            v.insert(
                "mode".into(),
                json!(if o.rate > 0.0 {
                    "open-loop"
                } else {
                    "closed-loop"
                }),
            );
            v.insert("target_rate".into(), json!(o.rate));
            v.insert("measured_seconds".into(), json!(secs));
            v.insert("sent".into(), json!(c("sent")));
            v.insert("received_in_window".into(), json!(got));
            v.insert(
                "achieved_rate".into(),
                json!((got as f64 / secs.max(1e-9)).round()),
            );
            v.insert("lost_in_window".into(), json!(c("lost_in_window")));
            v.insert("mismatched_echoes".into(), json!(c("mismatched_echoes")));
            v.insert("unsolicited_data".into(), json!(c("unsolicited_data")));
            v.insert("latency_us".into(), h("latency_us"));
            // One value per session: its longest echo wait in the window (a lost echo counts
            // as a wait until the end of the drain): the longest pause each client saw.
            v.insert("session_max_latency_us".into(), h("session_max_latency_us"));
            v.insert(
                "client_cpu_fraction".into(),
                json!(
                    (c("client_cpu_ms") as f64 / c("client_window_ms").max(1) as f64 * 1000.0)
                        .round()
                        / 1000.0
                ),
            );
            if o.rate > 0.0 {
                v.insert("send_lag_us".into(), h("send_lag_us"));
            }
            for k in ["lost_in_window", "mismatched_echoes", "unsolicited_data"] {
                if c(k) > 0 {
                    problems.push(format!("{k}: {}", c(k)));
                }
            }
            if got == 0 {
                problems.push("no echo was measured".into());
            }
            if c("alive_at_end") < established {
                problems.push(format!(
                    "{} sessions died during the run",
                    established - c("alive_at_end")
                ));
            }
        }
        "resume" | "resume-cross" => {
            v.insert("dropped".into(), json!(c("dropped")));
            v.insert("resumed".into(), json!(c("resumed")));
            v.insert("first_replay_received".into(), json!(c("replayed")));
            v.insert("resumed_with_gap".into(), json!(c("resumed_with_gap")));
            v.insert(
                "predrop_echo".into(),
                json!({"replayed": c("predrop_echo_replayed"), "live": c("predrop_echo_live")}),
            );
            let rounds: &[&str] = if sc == "resume" {
                &["resume"]
            } else {
                &["same_port", "cross_port"]
            };
            for r in rounds {
                v.insert(format!("{r}_resumed_us"), h(&format!("{r}_resumed_us")));
                v.insert(
                    format!("{r}_first_replay_us"),
                    h(&format!("{r}_first_replay_us")),
                );
            }
            let round_ms = results
                .iter()
                .flatten()
                .filter_map(|r| r["counts"]["round_ms"].as_u64())
                .max()
                .unwrap_or(0);
            // round_ms: each worker's resume time summed over its rounds.
            v.insert(
                "resumes_per_second".into(),
                json!((c("dropped") as f64 / (round_ms as f64 / 1000.0).max(1e-9)).round()),
            );
            if sc == "resume-cross" {
                let s = o.shards_hint;
                let owners: Vec<u64> = (0..s).map(|k| c(&format!("owner_shard_{k}"))).collect();
                v.insert("predicted_owner_shards".into(), json!(owners));
                let s64 = s as u64;
                let same_fb = c("same_port_unavailable");
                let cross_fb = c("cross_port_unavailable") + c("cross_port_unpaired");
                v.insert(
                    "shard_split".into(),
                    json!({
                        "method": "A session's id names the shard that accepted its CONNECT, and SO_REUSEPORT picks the accepting listener from the 4-tuple, so a reconnect from the previous source address+port of a session owned by shard X lands on X. Sessions are paired across owner shards; in each of two rounds every other pair swaps source ports (cross-shard by construction, recorded as cross_port) and the pairs in between reconnect from their own ports (same-shard by construction, recorded as same_port), the two groups interleaved in time so that the machine's noise hits both alike; the second round swaps the roles, so every session makes one resume of each kind. Where a port could not be re-bound (or no partner on another shard was left) a fresh port was used: those are counted under fallback and land on a uniform shard (cross-shard with probability (S-1)/S).",
                        "shards_hint": s,
                        "same_port": {"same_shard": c("same_port_bound"), "fallback_fresh_port": same_fb,
                            "cross_shard_expected_among_fallback": same_fb - same_fb / s64},
                        "cross_port": {"cross_shard": c("cross_port_bound"), "fallback_fresh_port": cross_fb,
                            "same_shard_expected_among_fallback": cross_fb / s64},
                    }),
                );
            }
            if c("resumed") < c("dropped") || c("replayed") < c("resumed") {
                problems.push(format!(
                    "dropped {}, resumed {}, replay received {}",
                    c("dropped"),
                    c("resumed"),
                    c("replayed")
                ));
            }
        }
        _ => {}
    }
    if let Some(f) = srv_cpu {
        v.insert(
            "server_cpu_fraction".into(),
            json!((f * 1000.0).round() / 1000.0),
        );
    }
    // Every CPU of the machine over the same window (from the go signal to the end): which
    // side was the limit, and the kernel's share (softirq) that the process figures leave out.
    v.insert("cpus".into(), cpus);
    v.insert("failures".into(), json!(failures));
    v.insert("other_frames".into(), json!(other));
    v.insert("counts".into(), json!(counts));
    v.insert(
        "wall_seconds".into(),
        json!(started.elapsed().as_secs_f64()),
    );
    let ok = problems.is_empty();
    v.insert("ok".into(), json!(ok));
    v.insert("problems".into(), json!(problems));
    let v = Value::Object(v);
    if ok {
        progress!(o, "done: ok");
    } else {
        progress!(o, "done: FAILED: {}", problems.join("; "));
    }
    emit(o, &v);
    i32::from(!ok)
}

fn emit(o: &Opts, v: &Value) {
    let s = serde_json::to_string_pretty(v).unwrap();
    println!("{s}");
    if let Some(p) = &o.json {
        if let Err(e) = std::fs::write(p, format!("{s}\n")) {
            eprintln!("loadgen: cannot write {}: {e}", p.display());
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("self-signed-cert") {
        // A throw-away certificate for the TLS and QUIC benchmarks (bench/run.sh).
        let Some(dir) = args.get(1) else {
            eprintln!("usage: loadgen self-signed-cert DIR");
            std::process::exit(2);
        };
        match clawterm::server::tls::self_signed(std::path::Path::new(dir)) {
            Ok((cert, key, _)) => {
                println!("{} {}", cert.display(), key.display());
                std::process::exit(0);
            }
            Err(e) => {
                eprintln!("loadgen self-signed-cert: {e}");
                std::process::exit(1);
            }
        }
    }
    if args.first().map(String::as_str) == Some("roam") {
        // Sessions under traffic while their node is drained (ClawRoam; docs/CLUSTER.md).
        std::process::exit(roam::main(&args[1..]));
    }
    if args.first().map(String::as_str) == Some("shells") {
        // N shell sessions through a `claw-agent shell` pod (bench/shells.sh).
        std::process::exit(shells::main(&args[1..]));
    }
    let o = match parse_args(&args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("loadgen: {e}\n{USAGE}");
            std::process::exit(2);
        }
    };
    let code = if o.scenario == "raw-echo-server" {
        raw_server::run(&o)
    } else if o.scenario == "bulk" {
        bulk::run(&o)
    } else if let Some(w) = o.worker {
        worker::run(&o, w)
    } else {
        coordinate(&o)
    };
    std::process::exit(code);
}
