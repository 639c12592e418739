//! One worker process: many nonblocking client sockets on one epoll, single-threaded.
//!
//! The coordinator (main.rs) starts one or more workers (`loadgen --worker I ...`), each with
//! its share of the sessions. A worker talks to the coordinator over its stdin/stdout:
//!
//! * stdout, one JSON object per line: `{"t":"progress",...}` about once a second,
//!   `{"t":"opened",...}` when its sessions are up, `{"t":"result",...}` at the end;
//! * stdin: the line `go` once every worker has reported `opened` (a barrier, so that the
//!   measured phase starts at the same time in every worker and the coordinator can read the
//!   server's RSS in between).
//!
//! The protocol (CONNECT / RESUME, ACKs, decoding, de-duplication) is the client library's
//! sans-IO core, [`ClientCore`], one per connection; this file is the multi-connection driver
//! around it (sockets, TLS, QUIC, scheduling) and the measurements. The core runs with
//! [`AckPolicy::Manual`]: each scenario decides when an ACK goes out (`--ack-delay`, piggybacked
//! on the next DATA, or never while priming a resume), the core what it says.

use crate::quic::{QEv, QuicEp};
use crate::sys::{self, Epoll, Src};
use crate::{Opts, Transport};
use clawterm::proto::{FrameType, FLAG_GAP, FLAG_REPLAY};
use clawterm_client::core::{AckPolicy, ClientCore, CoreEvent, CoreOptions, Seen, Timers};
use hdrhistogram::Histogram;
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, VecDeque};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub const PAYLOAD_LEN: usize = 32;
const STDIN_TOKEN: u64 = u64::MAX;
/// Every UDP socket of the QUIC endpoint (all are drained when one is readable).
const QUIC_TOKEN: u64 = u64::MAX - 1;

#[derive(Copy, Clone, PartialEq, Eq, Debug)]
enum St {
    Free,
    Connecting,
    /// TLS or QUIC handshake in progress (before CONNECT/RESUME is sent).
    Secure,
    AwaitHello,
    Up,
    /// DISCONNECT sent, waiting for the server to close.
    Closing,
    /// Dropped on purpose (resume scenario), to be resumed.
    Dropped,
    Dead,
}

#[derive(Copy, Clone, PartialEq, Eq)]
enum Hello {
    Connect,
    Resume,
    /// Raw echo: no protocol.
    Raw,
}

struct Conn {
    fd: i32,
    st: St,
    hello: Hello,
    /// The session's protocol state (unused by raw echo).
    core: ClientCore,
    /// Raw echo: the tag of the last message sent.
    raw_seq: u32,
    /// Start of the current connection (connect() call).
    t0: Instant,
    /// Received bytes not handled yet: decrypted TLS / QUIC stream bytes for the core, or raw
    /// echo bytes.
    rbuf: Vec<u8>,
    wbuf: Vec<u8>,
    epollout: bool,
    /// Outstanding echoes: (tag, intended or actual send time).
    out: VecDeque<(u32, Instant)>,
    /// Echo: the longest wait (µs) of any of this session's measured echoes, 0 if none (the
    /// per-session histogram `session_max_latency_us`: the longest pause each client saw).
    max_wait_us: u64,
    local: Option<SocketAddrV4>,
    /// The source address+port of the connection that opened the session (it landed on the
    /// owner shard, so a reconnect from it lands there again).
    home: Option<SocketAddrV4>,
    /// Resume: SEQ the client claims to have (RESUME.last_seq) and the echo SEQ expected first
    /// in the replay; whether the first replayed DATA has arrived.
    resume_last: u32,
    echo_seq: u32,
    echo_tag: u32,
    /// Tag of the DATA sent just before the drop (its echo may come replayed or live).
    late_tag: u32,
    want_replay: bool,
    /// A delayed ACK for this connection is in `Worker::ack_q`.
    ack_queued: bool,
    /// TLS over TCP.
    tls: Option<Box<rustls::ClientConnection>>,
    /// WebSocket over TCP (`--transport ws`).
    ws: Option<Box<crate::ws::WsClient>>,
    /// QUIC: the connection in the worker's endpoint.
    qch: Option<quinn_proto::ConnectionHandle>,
    /// Resume: the group this connection's resume is recorded under (`resume`, or
    /// `same_port` / `cross_port` in resume-cross).
    label: &'static str,
}

/// The loadgen's core settings: ACKs when the scenario says (`--ack-delay`), no RELIABLE (the
/// server would acknowledge every echo request: one more frame per message), DATA read through
/// the observer (no copy per frame), KEEPALIVE after `--keepalive`, and no dead-connection
/// timer (a broken connection shows as a socket error).
fn configure(core: &mut ClientCore, o: &Opts) {
    core.set_options(CoreOptions {
        acks: AckPolicy::Manual,
        offer_reliable: false,
        data_events: false,
        // The epoll driver does not follow ROAM: such sessions are relayed when they move.
        offer_roam: false,
    });
    core.set_timers(Timers {
        keepalive_ms: ((o.keepalive * 1000.0) as u64).max(1),
        dead_after_ms: u64::MAX / 4,
    });
}

fn new_core(o: &Opts) -> ClientCore {
    let mut c = ClientCore::new(o.tenant, o.agent, o.token);
    configure(&mut c, o);
    c
}

/// What loadgen needs of a frame the core handled (see [`Seen`]).
#[derive(Copy, Clone)]
struct Obs {
    ty: FrameType,
    seq: u32,
    flags: u8,
    fresh: bool,
    /// DATA: the tag in the first 4 bytes, and whether the payload is `data_payload(tag)`.
    tag: u32,
    ok: bool,
}

impl Obs {
    fn of(f: &Seen<'_>) -> Obs {
        let p = f.payload;
        let tag = if p.len() >= 4 {
            u32::from_be_bytes([p[0], p[1], p[2], p[3]])
        } else {
            0
        };
        Obs {
            ty: f.ty,
            seq: f.seq,
            flags: f.flags,
            fresh: f.fresh,
            tag,
            ok: f.ty == FrameType::Data && p.len() == PAYLOAD_LEN && p == data_payload(tag),
        }
    }
}

impl Conn {
    fn new(o: &Opts) -> Conn {
        let now = Instant::now();
        Conn {
            fd: -1,
            st: St::Free,
            hello: Hello::Connect,
            core: new_core(o),
            raw_seq: 0,
            t0: now,
            rbuf: Vec::new(),
            wbuf: Vec::new(),
            epollout: false,
            out: VecDeque::new(),
            max_wait_us: 0,
            local: None,
            home: None,
            resume_last: 0,
            echo_seq: 0,
            echo_tag: 0,
            late_tag: 0,
            want_replay: false,
            ack_queued: false,
            tls: None,
            ws: None,
            qch: None,
            label: "resume",
        }
    }
}

/// Where a resume reconnects from.
#[derive(Copy, Clone, PartialEq, Eq)]
enum Reconnect {
    /// A fresh source port.
    Fresh,
    /// The session's own previous source address and port (lands on the same shard).
    Own,
    /// resume-cross: sessions are paired across owner shards; every other pair swaps source
    /// ports (each lands on the other's owner: cross-shard), the pairs in between reconnect
    /// from their own ports (same-shard). The pair with index `p` crosses when `p % 2` equals
    /// the value; the two groups' resumes are interleaved in time, so the machine's noise hits
    /// both alike.
    Interleaved(usize),
}

/// What the worker is doing; decides how received frames are answered.
#[derive(Copy, Clone, PartialEq, Eq)]
enum Mode {
    Open,
    Idle,
    Connect,
    EchoOpen,
    EchoClosed,
    /// Waiting for one echo per session before dropping (resume).
    Prime,
    Resume,
}

pub fn data_payload(tag: u32) -> [u8; PAYLOAD_LEN] {
    let mut p = [0u8; PAYLOAD_LEN];
    for c in p.chunks_mut(4) {
        c.copy_from_slice(&tag.to_be_bytes());
    }
    p
}

fn src_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, 2 + (i % 8) as u8)
}

pub fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("histogram bounds")
}

pub fn hist_to_json(h: &Histogram<u64>) -> Value {
    Value::Array(
        h.iter_recorded()
            .map(|v| json!([v.value_iterated_to(), v.count_at_value()]))
            .collect(),
    )
}

struct Worker<'a> {
    o: &'a Opts,
    idx: usize,
    ep: Epoll,
    dst: SocketAddrV4,
    raw: bool,
    conns: Vec<Conn>,
    free: Vec<usize>,
    next_src: usize,
    hs_inflight: usize,
    mode: Mode,
    failures: BTreeMap<String, u64>,
    other: BTreeMap<String, u64>,
    counts: BTreeMap<&'static str, u64>,
    hists: BTreeMap<String, Histogram<u64>>,
    /// Echo measurement window (intended send times).
    win: Option<(Instant, Instant)>,
    resume_inflight: usize,
    go: bool,
    stdin_buf: Vec<u8>,
    last_progress: Instant,
    done_counter: u64,
    scratch: Vec<u8>,
    fbuf: Vec<u8>,
    /// Frames the core handled in the current read (reused).
    seen: Vec<Obs>,
    /// The cores' clock: milliseconds since this instant.
    epoch: Instant,
    events: Vec<libc::epoll_event>,
    // Per-message counters and histograms as plain fields (no map lookup or allocation per
    // message); merged into `counts`/`hists` by `result`.
    n_sent: u64,
    n_received: u64,
    n_in_window: u64,
    h_latency: Histogram<u64>,
    h_lag: Histogram<u64>,
    /// Echo: one value per session, its longest wait (`Conn::max_wait_us`).
    h_session_max: Histogram<u64>,
    /// Delayed ACKs: (due, connection), in due order (`--ack-delay`).
    ack_q: VecDeque<(Instant, usize)>,
    ack_delay: Duration,
    /// The open-loop sender spins (polls without sleeping) when its next message is due
    /// sooner than this (`--spin-us`).
    spin: Duration,
    /// TLS client configuration and server name (`--transport tls`).
    tls: Option<(
        Arc<rustls::ClientConfig>,
        rustls::pki_types::ServerName<'static>,
    )>,
    /// The QUIC endpoint (`--transport quic`).
    qep: Option<QuicEp>,
    qev: Vec<QEv>,
    /// TLS records to write (reused).
    tls_out: Vec<u8>,
}

fn out_line(v: Value) {
    let mut o = std::io::stdout().lock();
    let _ = writeln!(o, "{v}");
    let _ = o.flush();
}

impl<'a> Worker<'a> {
    fn new(o: &'a Opts, idx: usize) -> Result<Worker<'a>, String> {
        let ep = Epoll::new()?;
        sys::set_nonblocking(0);
        ep.ctl(libc::EPOLL_CTL_ADD, 0, STDIN_TOKEN, libc::EPOLLIN as u32);
        let mut tls = None;
        let mut qep = None;
        if matches!(o.transport, Transport::Tls | Transport::Quic) {
            let (cfg, name) = crate::tls_client(o)?;
            if o.transport == Transport::Quic {
                let host = match &name {
                    rustls::pki_types::ServerName::IpAddress(ip) => {
                        std::net::IpAddr::from(*ip).to_string()
                    }
                    rustls::pki_types::ServerName::DnsName(d) => d.as_ref().to_string(),
                    _ => o.target.ip().to_string(),
                };
                let sources: Vec<Ipv4Addr> = (0..8).map(|k| src_ip(idx * 3 + k)).collect();
                let q = QuicEp::new(cfg, o.target, &host, &sources)?;
                for fd in q.fds() {
                    ep.ctl(libc::EPOLL_CTL_ADD, fd, QUIC_TOKEN, libc::EPOLLIN as u32);
                }
                qep = Some(q);
            } else {
                tls = Some((cfg, name));
            }
        }
        Ok(Worker {
            o,
            idx,
            ep,
            dst: o.target,
            raw: o.scenario == "raw-echo",
            conns: Vec::new(),
            free: Vec::new(),
            next_src: idx * 3,
            hs_inflight: 0,
            mode: Mode::Open,
            failures: BTreeMap::new(),
            other: BTreeMap::new(),
            counts: BTreeMap::new(),
            hists: BTreeMap::new(),
            win: None,
            resume_inflight: 0,
            go: false,
            stdin_buf: Vec::new(),
            last_progress: Instant::now(),
            done_counter: 0,
            scratch: vec![0u8; 64 * 1024],
            fbuf: Vec::with_capacity(256),
            seen: Vec::new(),
            epoch: Instant::now(),
            events: vec![libc::epoll_event { events: 0, u64: 0 }; 1024],
            n_sent: 0,
            n_received: 0,
            n_in_window: 0,
            h_latency: new_hist(),
            h_lag: new_hist(),
            h_session_max: new_hist(),
            ack_q: VecDeque::new(),
            ack_delay: Duration::from_secs_f64(o.ack_delay_ms / 1000.0),
            spin: Duration::from_micros(o.spin_us),
            tls,
            qep,
            qev: Vec::new(),
            tls_out: Vec::new(),
        })
    }

    /// The cores' clock (ms).
    fn ms(&self) -> u64 {
        self.ms_at(Instant::now())
    }

    /// `at` on the cores' clock (ms).
    fn ms_at(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.epoch).as_millis() as u64
    }

    fn count(&mut self, k: &'static str, n: u64) {
        *self.counts.entry(k).or_insert(0) += n;
    }

    fn record(&mut self, name: &str, d: Duration) {
        let us = (d.as_micros() as u64).max(1);
        self.hists
            .entry(name.to_string())
            .or_insert_with(new_hist)
            .saturating_record(us);
    }

    fn count_failure(&mut self, what: String) {
        *self.failures.entry(what).or_insert(0) += 1;
    }

    fn up_count(&self) -> usize {
        self.conns.iter().filter(|c| c.st == St::Up).count()
    }

    fn progress(&mut self) {
        if self.last_progress.elapsed() < Duration::from_secs(1) {
            return;
        }
        self.last_progress = Instant::now();
        let failed: u64 = self.failures.values().sum();
        out_line(json!({
            "t": "progress",
            "up": self.up_count(),
            "failed": failed,
            "done": self.done_counter,
        }));
    }

    // ------------------------------------------------------------------ connections

    fn slot(&mut self) -> usize {
        if let Some(i) = self.free.pop() {
            self.conns[i] = Conn::new(self.o);
            i
        } else {
            self.conns.push(Conn::new(self.o));
            self.conns.len() - 1
        }
    }

    /// Starts a connection in slot `i` (new session, resume, or raw).
    fn start_conn(&mut self, i: usize, hello: Hello, src: Src) -> bool {
        if let Some(q) = self.qep.as_mut() {
            let sock = match src {
                Src::Ip(ip) => ip.octets()[3] as usize,
                Src::Exact(a) => a.ip().octets()[3] as usize,
            };
            match q.connect(i, sock) {
                Ok(ch) => {
                    let c = &mut self.conns[i];
                    c.qch = Some(ch);
                    c.fd = -1;
                    c.st = St::Secure;
                    c.hello = hello;
                    c.t0 = Instant::now();
                    c.rbuf.clear();
                    c.wbuf.clear();
                    self.hs_inflight += 1;
                    return true;
                }
                Err(e) => {
                    self.conns[i].st = St::Dead;
                    self.count_failure(format!("handshake: {e}"));
                    return false;
                }
            }
        }
        let (fd, now) = match sys::start_connect(src, self.dst) {
            Ok((fd, now, exact)) => {
                if let Src::Exact(_) = src {
                    let (bound, unavailable) = if self.conns[i].label == "cross_port" {
                        ("cross_port_bound", "cross_port_unavailable")
                    } else {
                        ("same_port_bound", "same_port_unavailable")
                    };
                    self.count(if exact { bound } else { unavailable }, 1);
                }
                (fd, now)
            }
            Err(e) => {
                self.conns[i].st = St::Dead;
                self.count_failure(format!("handshake: {e}"));
                return false;
            }
        };
        let c = &mut self.conns[i];
        c.fd = fd;
        c.st = St::Connecting;
        c.hello = hello;
        c.t0 = Instant::now();
        c.rbuf.clear();
        c.wbuf.clear();
        c.epollout = !now;
        self.hs_inflight += 1;
        let evs = libc::EPOLLIN as u32 | if now { 0 } else { libc::EPOLLOUT as u32 };
        if !self.ep.ctl(libc::EPOLL_CTL_ADD, fd, i as u64, evs) {
            let e = sys::errno_str();
            self.fail(i, format!("epoll_ctl: {e}"));
            return false;
        }
        if now {
            self.connected(i);
        }
        true
    }

    fn start_new(&mut self, hello: Hello) -> usize {
        let i = self.slot();
        let src = Src::Ip(src_ip(self.next_src));
        self.next_src += 1;
        self.start_conn(i, hello, src);
        i
    }

    fn connected(&mut self, i: usize) {
        self.conns[i].local = sys::local_addr(self.conns[i].fd);
        if self.conns[i].hello == Hello::Connect {
            self.conns[i].home = self.conns[i].local;
        }
        if self.o.transport == Transport::Ws && self.conns[i].hello != Hello::Raw {
            self.conns[i].ws = Some(Box::new(crate::ws::WsClient::new(
                (i as u32).wrapping_mul(0x9e37_79b9) ^ self.idx as u32,
            )));
            self.conns[i].st = St::Secure;
            let req = crate::ws::request(&self.dst.to_string());
            self.send_raw(i, &req);
            return;
        }
        if let Some((cfg, name)) = &self.tls {
            match rustls::ClientConnection::new(cfg.clone(), name.clone()) {
                Ok(t) => {
                    self.conns[i].tls = Some(Box::new(t));
                    self.conns[i].st = St::Secure;
                    self.tls_flush(i);
                }
                Err(e) => self.fail(i, format!("TLS: {e}")),
            }
            return;
        }
        self.secured(i);
    }

    /// The connection (and its TLS or QUIC handshake) is up: say hello.
    fn secured(&mut self, i: usize) {
        match self.conns[i].hello {
            Hello::Raw => {
                self.hs_done(i);
                let c = &mut self.conns[i];
                c.st = St::Up;
            }
            Hello::Connect => self.send_connect(i),
            Hello::Resume => self.send_resume(i),
        }
    }

    fn hs_done(&mut self, i: usize) {
        self.hs_inflight -= 1;
        let d = self.conns[i].t0.elapsed();
        self.record("handshake_us", d);
        self.count("established", 1);
        if self.mode == Mode::Connect {
            self.done_counter += 1;
        }
    }

    fn fail(&mut self, i: usize, why: String) {
        let c = &mut self.conns[i];
        let phase = match c.st {
            St::Dead | St::Free | St::Dropped => return,
            St::Connecting | St::Secure | St::AwaitHello => {
                self.hs_inflight -= 1;
                if c.hello == Hello::Resume {
                    "resume handshake"
                } else {
                    "handshake"
                }
            }
            St::Up if c.want_replay => "waiting for replay",
            St::Up => "established",
            St::Closing => "closing",
        };
        if c.want_replay {
            c.want_replay = false;
            self.resume_inflight -= 1;
        }
        let c = &mut self.conns[i];
        c.st = St::Dead;
        let fd = std::mem::replace(&mut c.fd, -1);
        c.rbuf = Vec::new();
        c.wbuf = Vec::new();
        c.tls = None;
        c.ws = None;
        let qch = c.qch.take();
        let lost = c.out.len() as u64;
        c.out.clear();
        sys::close(fd);
        if let (Some(ch), Some(q)) = (qch, self.qep.as_mut()) {
            q.close(ch, false);
        }
        if lost > 0 {
            self.count("echo_lost_on_failed_sessions", lost);
        }
        self.count_failure(format!("{phase}: {why}"));
    }

    /// Closes a connection that ended normally; the slot becomes reusable.
    fn release(&mut self, i: usize) {
        let c = &mut self.conns[i];
        let fd = std::mem::replace(&mut c.fd, -1);
        c.st = St::Free;
        c.tls = None;
        c.ws = None;
        let qch = c.qch.take();
        sys::close(fd);
        if let (Some(ch), Some(q)) = (qch, self.qep.as_mut()) {
            q.close(ch, false);
        }
        self.free.push(i);
    }

    /// Writes what the session's core has to send.
    fn flush_core(&mut self, i: usize) {
        if !self.conns[i].core.has_output() {
            return;
        }
        let mut buf = std::mem::take(&mut self.fbuf);
        buf.clear();
        self.conns[i].core.take_output_into(&mut buf);
        self.send(i, &buf);
        self.fbuf = buf;
    }

    fn send_connect(&mut self, i: usize) {
        let mut nonce = [0u8; 16];
        nonce[..8].copy_from_slice(&(i as u64).to_be_bytes());
        nonce[8..12].copy_from_slice(&(self.idx as u32).to_be_bytes());
        let now = self.ms();
        self.conns[i].st = St::AwaitHello;
        self.conns[i].core.start_connect(nonce, now);
        self.flush_core(i);
    }

    fn send_resume(&mut self, i: usize) {
        let now = self.ms();
        self.conns[i].st = St::AwaitHello;
        self.conns[i].core.start_resume(now);
        self.flush_core(i);
    }

    /// Sends one 32-byte DATA (or raw message) whose echo is expected; `at` = intended time.
    /// With `ack`, the ACK the core owes (if any) goes first in the same write.
    fn send_data(&mut self, i: usize, at: Instant, ack: bool) {
        if self.conns[i].st != St::Up {
            self.count("sends_skipped_dead_session", 1);
            return;
        }
        if self.raw {
            let c = &mut self.conns[i];
            c.raw_seq = c.raw_seq.wrapping_add(1);
            let tag = c.raw_seq;
            c.out.push_back((tag, at));
            self.send(i, &data_payload(tag));
        } else {
            let now = self.ms_at(Instant::now());
            let mut buf = std::mem::take(&mut self.fbuf);
            buf.clear();
            let c = &mut self.conns[i];
            // The core writes into the worker's buffer (hot in the cache), not its own.
            let tag = c.core.output_into(&mut buf, |core| {
                if ack {
                    core.ack_now(now);
                }
                let tag = core.next_seq();
                core.send_data(&data_payload(tag), now);
                tag
            });
            c.out.push_back((tag, at));
            self.send(i, &buf);
            self.fbuf = buf;
        }
        self.n_sent += 1;
    }

    fn send_ack(&mut self, i: usize) {
        if self.conns[i].st != St::Up || !self.conns[i].core.ack_pending() {
            return;
        }
        let now = self.ms();
        let mut buf = std::mem::take(&mut self.fbuf);
        buf.clear();
        self.conns[i]
            .core
            .output_into(&mut buf, |core| core.ack_now(now));
        self.send(i, &buf);
        self.fbuf = buf;
    }

    /// Sends protocol bytes on the session's transport.
    fn send(&mut self, i: usize, bytes: &[u8]) {
        if let Some(ch) = self.conns[i].qch {
            if let Some(q) = self.qep.as_mut() {
                q.write(ch, bytes);
            }
            return;
        }
        if let Some(w) = self.conns[i].ws.as_mut() {
            let mut out = std::mem::take(&mut self.tls_out);
            out.clear();
            w.frame(&mut out, bytes);
            self.send_raw(i, &out);
            self.tls_out = out;
            return;
        }
        if let Some(t) = self.conns[i].tls.as_mut() {
            // The plaintext buffer is unbounded by default: this cannot fail.
            let _ = t.writer().write_all(bytes);
            self.tls_flush(i);
            return;
        }
        self.send_raw(i, bytes);
    }

    /// Writes the TLS records the connection has pending.
    fn tls_flush(&mut self, i: usize) {
        let Some(t) = self.conns[i].tls.as_mut() else {
            return;
        };
        let mut out = std::mem::take(&mut self.tls_out);
        out.clear();
        while t.wants_write() {
            if t.write_tls(&mut out).is_err() {
                break;
            }
        }
        if !out.is_empty() {
            self.send_raw(i, &out);
        }
        self.tls_out = out;
    }

    /// Writes bytes to the socket, queueing what it does not take.
    fn send_raw(&mut self, i: usize, bytes: &[u8]) {
        let c = &mut self.conns[i];
        if c.fd < 0 {
            return;
        }
        let mut from = 0;
        if c.wbuf.is_empty() {
            // SAFETY: writing from a valid slice to our own fd.
            let n =
                unsafe { libc::write(c.fd, bytes.as_ptr() as *const libc::c_void, bytes.len()) };
            if n < 0 {
                if sys::errno() != libc::EAGAIN {
                    let s = sys::errno_str();
                    self.fail(i, format!("write: {s}"));
                    return;
                }
            } else {
                from = n as usize;
            }
            if from == bytes.len() {
                return;
            }
        }
        let c = &mut self.conns[i];
        c.wbuf.extend_from_slice(&bytes[from..]);
        if !c.epollout {
            c.epollout = true;
            let fd = c.fd;
            self.ep.ctl(
                libc::EPOLL_CTL_MOD,
                fd,
                i as u64,
                (libc::EPOLLIN | libc::EPOLLOUT) as u32,
            );
        }
    }

    fn flush(&mut self, i: usize) {
        let c = &mut self.conns[i];
        while !c.wbuf.is_empty() {
            // SAFETY: as in `send`.
            let n =
                unsafe { libc::write(c.fd, c.wbuf.as_ptr() as *const libc::c_void, c.wbuf.len()) };
            if n < 0 {
                if sys::errno() == libc::EAGAIN {
                    return;
                }
                let s = sys::errno_str();
                self.fail(i, format!("write: {s}"));
                return;
            }
            c.wbuf.drain(..n as usize);
        }
        c.epollout = false;
        let fd = c.fd;
        self.ep
            .ctl(libc::EPOLL_CTL_MOD, fd, i as u64, libc::EPOLLIN as u32);
    }

    // ------------------------------------------------------------------ event loop

    fn poll(&mut self, mut timeout: Duration) {
        if self.qep.is_some() {
            // What QUIC has to send goes out before sleeping; its timers bound the sleep.
            self.quic_step(|q, ev| q.flush(ev));
            if let Some(d) = self.qep.as_mut().and_then(|q| q.next_deadline()) {
                timeout = timeout.min(d.saturating_duration_since(Instant::now()));
            }
        }
        let mut evs = std::mem::take(&mut self.events);
        let n = self.ep.wait(&mut evs, timeout);
        for ev in evs.iter().take(n) {
            let (tok, flags) = (ev.u64, ev.events);
            if tok == STDIN_TOKEN {
                self.read_stdin();
                continue;
            }
            if tok == QUIC_TOKEN {
                self.quic_step(|q, ev| q.on_readable(ev));
                continue;
            }
            let i = tok as usize;
            let st = self.conns[i].st;
            if matches!(st, St::Dead | St::Free | St::Dropped) {
                continue;
            }
            if st == St::Connecting {
                let err = sys::so_error(self.conns[i].fd);
                if err != 0 {
                    let e = std::io::Error::from_raw_os_error(err);
                    self.fail(i, format!("connect: {e}"));
                } else if flags & libc::EPOLLOUT as u32 != 0 {
                    let c = &mut self.conns[i];
                    c.epollout = false;
                    let fd = c.fd;
                    self.ep
                        .ctl(libc::EPOLL_CTL_MOD, fd, i as u64, libc::EPOLLIN as u32);
                    self.connected(i);
                }
                continue;
            }
            if flags & libc::EPOLLOUT as u32 != 0 {
                self.flush(i);
            }
            if flags & (libc::EPOLLIN | libc::EPOLLERR | libc::EPOLLHUP) as u32 != 0 {
                self.read_ready(i);
            }
        }
        self.events = evs;
        if self.qep.is_some() {
            self.quic_step(|q, ev| q.on_timeouts(ev));
        }
        self.progress();
    }

    /// Runs one step of the QUIC endpoint and handles what it reports.
    fn quic_step(&mut self, step: impl FnOnce(&mut QuicEp, &mut Vec<QEv>)) {
        let Some(q) = self.qep.as_mut() else { return };
        let mut evs = std::mem::take(&mut self.qev);
        step(q, &mut evs);
        for ev in evs.drain(..) {
            match ev {
                QEv::Connected(i) => {
                    if self.conns[i].st == St::Secure {
                        self.secured(i);
                    }
                }
                QEv::Readable(i) => {
                    let (Some(ch), Some(q)) = (self.conns[i].qch, self.qep.as_mut()) else {
                        continue;
                    };
                    let mut rb = std::mem::take(&mut self.conns[i].rbuf);
                    q.read(ch, &mut rb);
                    self.conns[i].rbuf = rb;
                    if matches!(self.conns[i].st, St::AwaitHello | St::Up | St::Closing) {
                        self.feed(i, None);
                        self.after_read(i);
                    }
                }
                QEv::Lost(i, why) => {
                    if self.conns[i].st == St::Closing {
                        self.count("closed_cleanly", 1);
                        self.release(i);
                    } else {
                        self.fail(i, why);
                    }
                }
            }
        }
        self.qev = evs;
    }

    fn read_stdin(&mut self) {
        let mut b = [0u8; 256];
        loop {
            // SAFETY: reading into a local buffer from fd 0.
            let n = unsafe { libc::read(0, b.as_mut_ptr() as *mut libc::c_void, b.len()) };
            if n <= 0 {
                if n == 0 {
                    // The coordinator went away: stop waiting for it.
                    self.ep.ctl(libc::EPOLL_CTL_DEL, 0, STDIN_TOKEN, 0);
                    self.go = true;
                }
                return;
            }
            self.stdin_buf.extend_from_slice(&b[..n as usize]);
            if self.stdin_buf.windows(2).any(|w| w == b"go") {
                self.go = true;
            }
        }
    }

    fn read_ready(&mut self, i: usize) {
        loop {
            let st = self.conns[i].st;
            if matches!(st, St::Dead | St::Free | St::Dropped) {
                return;
            }
            let fd = self.conns[i].fd;
            // SAFETY: reading into our own scratch buffer.
            let n = unsafe {
                libc::read(
                    fd,
                    self.scratch.as_mut_ptr() as *mut libc::c_void,
                    self.scratch.len(),
                )
            };
            if n == 0 {
                if st == St::Closing {
                    self.count("closed_cleanly", 1);
                    self.release(i);
                } else {
                    self.fail(i, "server closed the connection (EOF)".into());
                }
                return;
            }
            if n < 0 {
                let e = sys::errno();
                if e != libc::EAGAIN {
                    if st == St::Closing && e == libc::ECONNRESET {
                        self.count("closed_with_reset", 1);
                        self.release(i);
                    } else {
                        let s = sys::errno_str();
                        self.fail(i, format!("read: {s}"));
                    }
                }
                return;
            }
            let n = n as usize;
            if self.raw {
                self.raw_bytes(i, n);
            } else if self.conns[i].tls.is_some() {
                self.tls_in(i, n);
            } else if self.conns[i].ws.is_some() {
                self.ws_in(i, n);
            } else {
                self.feed(i, Some(n));
            }
            if n < self.scratch.len() {
                break;
            }
        }
        self.after_read(i);
    }

    /// `n` bytes of TLS records in the scratch buffer: decrypt, finish the handshake, decode.
    fn tls_in(&mut self, i: usize, n: usize) {
        let c = &mut self.conns[i];
        let (Some(t), rb) = (c.tls.as_mut(), &mut c.rbuf) else {
            return;
        };
        let mut rd = &self.scratch[..n];
        let mut err = None;
        while !rd.is_empty() {
            match t.read_tls(&mut rd) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) => {
                    err = Some(e.to_string());
                    break;
                }
            }
            if let Err(e) = t.process_new_packets() {
                err = Some(e.to_string());
                break;
            }
            let mut chunk = [0u8; 16 * 1024];
            loop {
                match t.reader().read(&mut chunk) {
                    Ok(0) => break,
                    Ok(k) => rb.extend_from_slice(&chunk[..k]),
                    Err(_) => break, // WouldBlock: nothing more decrypted yet
                }
            }
        }
        let handshaking = t.is_handshaking();
        self.tls_flush(i);
        if let Some(e) = err {
            self.fail(i, format!("TLS: {e}"));
            return;
        }
        if self.conns[i].st == St::Secure {
            if handshaking {
                return;
            }
            self.secured(i);
        }
        if !self.conns[i].rbuf.is_empty() {
            self.feed(i, None);
        }
    }

    /// `n` bytes of WebSocket in the scratch buffer: the upgrade's answer, then binary
    /// messages whose payload is the protocol's byte stream.
    fn ws_in(&mut self, i: usize, n: usize) {
        let c = &mut self.conns[i];
        let (Some(w), rb) = (c.ws.as_mut(), &mut c.rbuf) else {
            return;
        };
        let mut reply = Vec::new();
        let opened = match w.feed(&self.scratch[..n], rb, &mut reply) {
            Ok(o) => o,
            Err(e) => {
                self.fail(i, e);
                return;
            }
        };
        if !reply.is_empty() {
            self.send_raw(i, &reply);
        }
        if opened && self.conns[i].st == St::Secure {
            self.secured(i);
        }
        if self.conns[i].ws.as_ref().is_some_and(|w| w.is_open()) && !self.conns[i].rbuf.is_empty()
        {
            self.feed(i, None);
        }
    }

    /// After a read: this scenario's ACK policy.
    fn after_read(&mut self, i: usize) {
        if self.mode == Mode::Resume || (self.mode == Mode::EchoOpen && self.ack_delay.is_zero()) {
            self.send_ack(i);
        } else if self.mode == Mode::EchoOpen {
            // Delayed ACK: piggybacked on this session's next DATA if one goes out within
            // `--ack-delay`, sent on its own otherwise.
            let c = &mut self.conns[i];
            if !c.ack_queued && c.st == St::Up && c.core.ack_pending() {
                c.ack_queued = true;
                self.ack_q.push_back((Instant::now() + self.ack_delay, i));
            }
        }
    }

    /// Sends the delayed ACKs that are due (all of them with `all`).
    fn flush_due_acks(&mut self, all: bool) {
        let now = Instant::now();
        while let Some(&(due, i)) = self.ack_q.front() {
            if !all && due > now {
                break;
            }
            self.ack_q.pop_front();
            self.conns[i].ack_queued = false;
            self.send_ack(i);
        }
    }

    fn raw_bytes(&mut self, i: usize, n: usize) {
        let now = Instant::now();
        let mut rb = std::mem::take(&mut self.conns[i].rbuf);
        rb.extend_from_slice(&self.scratch[..n]);
        let mut off = 0;
        while rb.len() - off >= PAYLOAD_LEN {
            let chunk: [u8; PAYLOAD_LEN] = rb[off..off + PAYLOAD_LEN].try_into().unwrap();
            off += PAYLOAD_LEN;
            let tag = u32::from_be_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
            self.echo(i, tag, chunk == data_payload(tag), now);
        }
        rb.drain(..off);
        if self.conns[i].st != St::Dead {
            self.conns[i].rbuf = rb;
        }
    }

    /// Hands received protocol bytes to the session's core (`n` bytes of the scratch buffer,
    /// or with `None` what `rbuf` holds) and acts on the frames it handled and its events.
    fn feed(&mut self, i: usize, scratch: Option<usize>) {
        if self.conns[i].st == St::Closing {
            // DISCONNECT sent: whatever still comes is not looked at.
            self.conns[i].rbuf.clear();
            return;
        }
        let now = Instant::now();
        let now_ms = self.ms_at(now);
        let mut seen = std::mem::take(&mut self.seen);
        seen.clear();
        let c = &mut self.conns[i];
        let mut rbuf = std::mem::take(&mut c.rbuf);
        let bytes: &[u8] = match scratch {
            Some(n) => &self.scratch[..n],
            None => &rbuf,
        };
        let res = c
            .core
            .on_bytes_observed(bytes, now_ms, |f| seen.push(Obs::of(f)));
        rbuf.clear();
        c.rbuf = rbuf;
        for f in &seen {
            if matches!(self.conns[i].st, St::Dead | St::Free | St::Closing) {
                break;
            }
            self.on_frame(i, *f, now);
        }
        self.seen = seen;
        while let Some(ev) = self.conns[i].core.poll_event() {
            let why = match ev {
                CoreEvent::Error { code, message } => {
                    format!("ERROR frame code {code} `{message}`")
                }
                CoreEvent::Ended => "DISCONNECT from the server".into(),
                CoreEvent::Roam(a) => format!("ROAM to {a} from the server"),
                // ACCEPT and RESUMED were handled as frames; GAP is in RESUMED's flags.
                _ => continue,
            };
            if self.conns[i].st != St::Closing {
                self.fail(i, why);
            }
        }
        if let Err(e) = res {
            let why = match e {
                clawterm_client::core::CoreError::Decode(e) => {
                    format!("undecodable bytes from the server: {e}")
                }
                e => e.to_string(),
            };
            self.fail(i, why);
        }
    }

    /// A frame the session's core handled (in order).
    fn on_frame(&mut self, i: usize, f: Obs, now: Instant) {
        let st = self.conns[i].st;
        match f.ty {
            // The core takes ACCEPT only in answer to CONNECT, RESUMED only to RESUME.
            FrameType::Accept => {
                self.conns[i].st = St::Up;
                self.hs_done(i);
                if self.mode == Mode::Connect {
                    let now = self.ms();
                    self.conns[i].core.disconnect(now);
                    self.flush_core(i);
                    if self.conns[i].st == St::Up {
                        self.conns[i].st = St::Closing;
                    }
                }
            }
            FrameType::Resumed => {
                self.hs_inflight -= 1;
                let d = self.conns[i].t0.elapsed();
                let name = format!("{}_resumed_us", self.conns[i].label);
                self.record(&name, d);
                self.count("resumed", 1);
                if f.flags & FLAG_GAP != 0 {
                    self.count("resumed_with_gap", 1);
                    self.count_failure("resume: RESUMED carried GAP".into());
                }
                let c = &mut self.conns[i];
                c.st = St::Up;
                let Some(r) = c.core.last_resumed() else {
                    return self.fail(i, "RESUMED payload malformed".into());
                };
                if r.session_id != c.core.session_id() {
                    return self.fail(i, "RESUMED for another session id".into());
                }
                if r.first_replay_seq == 0 {
                    c.want_replay = false;
                    self.resume_inflight -= 1;
                    self.count_failure("resume: RESUMED announced no replay".into());
                } else if r.first_replay_seq != c.echo_seq {
                    let (a, b) = (r.first_replay_seq, c.echo_seq);
                    self.count_failure(format!(
                        "resume: first_replay_seq {a} != SEQ of the unacknowledged echo {b}"
                    ));
                }
            }
            FrameType::Data if !f.fresh => {
                // Already held (the core de-duplicates): not an echo.
                *self.other.entry("DATA already held".into()).or_insert(0) += 1
            }
            FrameType::Data => {
                let (seq, tag, ok) = (f.seq, f.tag, f.ok);
                let c = &mut self.conns[i];
                if f.flags & FLAG_REPLAY != 0 {
                    if c.want_replay {
                        c.want_replay = false;
                        self.resume_inflight -= 1;
                        let d = c.t0.elapsed();
                        let ok = ok && tag == c.echo_tag && seq == c.echo_seq;
                        let name = format!("{}_first_replay_us", c.label);
                        self.record(&name, d);
                        self.count("replayed", 1);
                        self.done_counter += 1;
                        if !ok {
                            self.count_failure(
                                "resume: first replayed DATA is not the unacknowledged echo".into(),
                            );
                        }
                    } else {
                        if c.late_tag != 0 && ok && tag == c.late_tag {
                            c.late_tag = 0;
                            self.count("predrop_echo_replayed", 1);
                        }
                        self.count("replayed_extra_frames", 1);
                    }
                    return;
                }
                if c.late_tag != 0 && c.late_tag == tag && ok {
                    // The echo of the DATA sent just before the drop, arriving live.
                    c.late_tag = 0;
                    self.count("predrop_echo_live", 1);
                    return;
                }
                if self.mode == Mode::Prime && c.out.front().map(|x| x.0) == Some(tag) {
                    c.echo_seq = seq;
                    c.echo_tag = tag;
                }
                self.echo(i, tag, ok, now);
            }
            FrameType::Keepalive => *self.other.entry("KEEPALIVE".into()).or_insert(0) += 1,
            FrameType::Ack => *self.other.entry("ACK".into()).or_insert(0) += 1,
            // Reported as events (see `feed`).
            FrameType::Error | FrameType::Disconnect | FrameType::Roam => {}
            t => {
                *self
                    .other
                    .entry(format!("{} (in state {st:?})", t.name()))
                    .or_insert(0) += 1
            }
        }
    }

    /// An echoed message with `tag` arrived on `i`.
    fn echo(&mut self, i: usize, tag: u32, ok: bool, now: Instant) {
        let front = self.conns[i].out.front().copied();
        let Some((want, at)) = front else {
            self.count("unsolicited_data", 1);
            return;
        };
        if want != tag || !ok {
            self.count("mismatched_echoes", 1);
            // Resynchronise on the tag if it is further down the queue.
            if let Some(pos) = self.conns[i].out.iter().position(|x| x.0 == tag) {
                self.conns[i].out.drain(..pos);
            } else {
                return;
            }
        }
        let (_, at) = self.conns[i].out.pop_front().unwrap_or((tag, at));
        self.n_received += 1;
        if let Some((a, b)) = self.win {
            if at >= a && at < b {
                self.n_in_window += 1;
                self.done_counter += 1;
                let us = (now.saturating_duration_since(at).as_micros() as u64).max(1);
                self.h_latency.saturating_record(us);
                let c = &mut self.conns[i];
                c.max_wait_us = c.max_wait_us.max(us);
            }
        }
        if self.mode == Mode::EchoClosed && self.win.is_some() {
            self.send_data(i, now, true);
        }
    }

    fn pump_until(&mut self, limit: Duration, done: impl Fn(&Worker) -> bool) -> bool {
        let end = Instant::now() + limit;
        loop {
            if done(self) {
                return true;
            }
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            self.poll(left.min(Duration::from_millis(20)));
        }
    }

    /// Opens `n` sessions (or raw connections), `inflight` handshakes at a time.
    fn open(&mut self, n: usize) -> Result<f64, String> {
        let t = Instant::now();
        let limit = Duration::from_secs(60 + n as u64 / 100);
        let hello = if self.raw { Hello::Raw } else { Hello::Connect };
        let mut started = 0;
        // `--open-rate`: new connections per second (0: as fast as `--inflight` allows).
        let pace = (self.o.open_rate > 0.0).then(|| 1.0 / self.o.open_rate);
        loop {
            while started < n && self.hs_inflight < self.o.inflight {
                if let Some(iv) = pace {
                    if t + Duration::from_secs_f64(started as f64 * iv) > Instant::now() {
                        break;
                    }
                }
                self.start_new(hello);
                started += 1;
            }
            if started == n && self.hs_inflight == 0 {
                return Ok(t.elapsed().as_secs_f64());
            }
            if t.elapsed() > limit {
                return Err(format!(
                    "gave up after {:.1} s: {started} of {n} started, {} handshakes still pending",
                    t.elapsed().as_secs_f64(),
                    self.hs_inflight
                ));
            }
            self.poll(Duration::from_millis(if pace.is_some() { 1 } else { 10 }));
        }
    }

    fn wait_go(&mut self) -> Result<(), String> {
        let t = Instant::now();
        while !self.go {
            if t.elapsed() > Duration::from_secs(900) {
                return Err("no `go` from the coordinator within 900 s".into());
            }
            self.poll(Duration::from_millis(20));
        }
        Ok(())
    }

    fn up_list(&self) -> Vec<usize> {
        (0..self.conns.len())
            .filter(|&i| self.conns[i].st == St::Up)
            .collect()
    }

    /// Sends DISCONNECT on every live session and closes (FIN). Bounded: no waiting.
    fn disconnect_all(&mut self) {
        for i in 0..self.conns.len() {
            if self.conns[i].st == St::Up {
                if !self.raw {
                    let now = self.ms();
                    self.conns[i].core.disconnect(now);
                    self.flush_core(i);
                }
                let c = &mut self.conns[i];
                if let (Some(ch), Some(q)) = (c.qch.take(), self.qep.as_mut()) {
                    c.st = St::Free;
                    q.close(ch, false);
                } else if c.fd >= 0 {
                    let fd = std::mem::replace(&mut c.fd, -1);
                    c.st = St::Free;
                    c.tls = None;
                    c.ws = None;
                    sys::close(fd);
                }
            }
        }
        // The QUIC closes go out now: the worker may exit next.
        self.quic_step(|q, ev| q.flush(ev));
    }

    // ------------------------------------------------------------------ scenarios

    fn opened(&mut self, open_s: f64) {
        out_line(json!({
            "t": "opened",
            "established": self.up_count(),
            "failed": self.failures.values().sum::<u64>(),
            "open_seconds": open_s,
        }));
    }

    fn idle(&mut self) -> Result<(), String> {
        let open_s = self.open(self.o.sessions)?;
        self.opened(open_s);
        self.wait_go()?;
        self.mode = Mode::Idle;
        let t = Instant::now();
        let end = t + Duration::from_secs_f64(self.o.duration);
        let mut cursor = 0;
        while Instant::now() < end {
            self.done_counter = self.up_count() as u64;
            // At most 2,000 keepalives per turn, round robin.
            let now = self.ms();
            let mut sent = 0;
            for _ in 0..self.conns.len().min(20_000) {
                if self.conns.is_empty() {
                    break;
                }
                cursor = (cursor + 1) % self.conns.len();
                let c = &mut self.conns[cursor];
                if c.st != St::Up {
                    continue;
                }
                // The core sends a KEEPALIVE once nothing was sent for `--keepalive`.
                c.core.tick(now);
                if c.core.has_output() {
                    self.flush_core(cursor);
                    self.count("keepalives_sent", 1);
                    sent += 1;
                    if sent >= 2000 {
                        break;
                    }
                }
            }
            let left = end.saturating_duration_since(Instant::now());
            self.poll(left.min(Duration::from_millis(50)));
        }
        self.count("hold_ms", t.elapsed().as_millis() as u64);
        let alive = self.up_count() as u64;
        self.count("alive_at_end", alive);
        self.disconnect_all();
        Ok(())
    }

    fn connect(&mut self) -> Result<(), String> {
        self.opened(0.0);
        self.wait_go()?;
        self.mode = Mode::Connect;
        let t = Instant::now();
        let end = t + Duration::from_secs_f64(self.o.duration);
        let mut last_sweep = Instant::now();
        loop {
            let now = Instant::now();
            let running = now < end;
            let mut busy = self.conns.len() - self.free.len();
            busy -= self
                .conns
                .iter()
                .filter(|c| c.st == St::Dead)
                .count()
                .min(busy);
            if running {
                while busy < self.o.inflight {
                    self.start_new(Hello::Connect);
                    busy += 1;
                }
            } else if self.hs_inflight == 0
                && !self
                    .conns
                    .iter()
                    .any(|c| c.st == St::Closing || c.st == St::Up)
            {
                break;
            }
            if now > end + Duration::from_secs(10) {
                break;
            }
            if last_sweep.elapsed() > Duration::from_secs(1) {
                last_sweep = Instant::now();
                // Reclaim dead slots; flag connections the server did not close in 5 s.
                for i in 0..self.conns.len() {
                    match self.conns[i].st {
                        St::Dead => {
                            self.conns[i].st = St::Free;
                            self.free.push(i);
                        }
                        St::Closing | St::AwaitHello | St::Connecting | St::Secure
                            if self.conns[i].t0.elapsed() > Duration::from_secs(10) =>
                        {
                            self.fail(i, "no progress for 10 s".into());
                        }
                        _ => {}
                    }
                }
            }
            self.poll(Duration::from_millis(5));
        }
        self.count("measured_ms", t.elapsed().min(end - t).as_millis() as u64);
        for i in 0..self.conns.len() {
            if matches!(
                self.conns[i].st,
                St::Closing | St::AwaitHello | St::Connecting | St::Secure | St::Up
            ) {
                self.fail(i, "still open at the end of the drain".into());
            }
        }
        Ok(())
    }

    fn echo_scenario(&mut self) -> Result<(), String> {
        let open_s = self.open(self.o.sessions)?;
        self.opened(open_s);
        self.wait_go()?;
        let ups = self.up_list();
        if ups.is_empty() {
            return Err("no session is up".into());
        }
        let t0 = Instant::now();
        let warm = Duration::from_secs_f64(self.o.warmup);
        let dur = Duration::from_secs_f64(self.o.duration);
        let (wa, wb) = (t0 + warm, t0 + warm + dur);
        self.win = Some((wa, wb));
        let cpu0 = sys::self_cpu_s();
        if self.o.rate <= 0.0 {
            self.mode = Mode::EchoClosed;
            for &i in &ups {
                self.send_data(i, Instant::now(), true);
            }
            while Instant::now() < wb {
                self.poll(Duration::from_millis(5));
            }
            self.win = Some((wa, wb));
            self.mode = Mode::EchoOpen; // stop sending follow-ups; drain below
        } else {
            self.mode = Mode::EchoOpen;
            let interval = 1.0 / self.o.rate;
            let mut m: u64 = 0;
            loop {
                let now = Instant::now();
                let mut due = t0 + Duration::from_secs_f64(m as f64 * interval);
                let mut burst = 0;
                while due <= now && due < wb && burst < 10_000 {
                    // How far behind its schedule the sender is (client-side starvation).
                    let lag = (now.saturating_duration_since(due).as_micros() as u64).max(1);
                    self.h_lag.saturating_record(lag);
                    let i = ups[(m as usize) % ups.len()];
                    // With a delayed ACK pending, it rides along in the same write.
                    self.send_data(i, due, true);
                    m += 1;
                    burst += 1;
                    due = t0 + Duration::from_secs_f64(m as f64 * interval);
                }
                if due >= wb && now >= wb {
                    break;
                }
                self.flush_due_acks(false);
                // Sleeping costs a timer and a wake-up (tens of µs on a VM) and wakes late by
                // the timer slack: when the next message is due soon, poll without sleeping.
                let wait = due.saturating_duration_since(Instant::now());
                if wait <= self.spin {
                    self.poll(Duration::ZERO);
                } else {
                    self.poll((wait - self.spin / 2).min(Duration::from_millis(5)));
                }
            }
            self.count("scheduled", m);
        }
        let cpu1 = sys::self_cpu_s();
        self.count("client_cpu_ms", ((cpu1 - cpu0) * 1000.0) as u64);
        self.count("client_window_ms", t0.elapsed().as_millis() as u64);
        self.count("measured_ms", dur.as_millis() as u64);
        // Drain: wait for the last echoes (late ones are latency, not losses) until all are
        // back, or nothing arrived for 3 s, or 60 s in all.
        let drain = Instant::now();
        let mut last_n = self.n_received;
        let mut last_t = Instant::now();
        while drain.elapsed() < Duration::from_secs(60)
            && last_t.elapsed() < Duration::from_secs(3)
            && !self.conns.iter().all(|c| c.out.is_empty())
        {
            self.poll(Duration::from_millis(20));
            self.flush_due_acks(true);
            let n = self.n_received;
            if n != last_n {
                last_n = n;
                last_t = Instant::now();
            }
        }
        self.count("drain_ms", drain.elapsed().as_millis() as u64);
        let (a, b) = (wa, wb);
        let mut lost = 0;
        let end = Instant::now();
        for c in &self.conns {
            let mut max = c.max_wait_us;
            for x in c.out.iter().filter(|x| x.1 >= a && x.1 < b) {
                lost += 1;
                // An echo that never came: the session waited at least until now.
                max = max.max((end.saturating_duration_since(x.1).as_micros() as u64).max(1));
            }
            if max > 0 {
                self.h_session_max.saturating_record(max);
            }
        }
        self.count("lost_in_window", lost);
        let alive = self.up_count() as u64;
        self.count("alive_at_end", alive);
        self.disconnect_all();
        Ok(())
    }

    /// Resume: one round (`resume`, `--reconnect`), or two (`resume-cross`: same port, then
    /// new port).
    fn resume_scenario(&mut self) -> Result<(), String> {
        let open_s = self.open(self.o.sessions)?;
        self.opened(open_s);
        self.wait_go()?;
        // resume-cross: two rounds, so that every session makes one same-shard and one
        // cross-shard resume.
        let rounds: Vec<Reconnect> = if self.o.scenario == "resume-cross" {
            vec![Reconnect::Interleaved(0), Reconnect::Interleaved(1)]
        } else if self.o.same_port {
            vec![Reconnect::Own]
        } else {
            vec![Reconnect::Fresh]
        };
        for how in rounds {
            self.resume_round(how)?;
        }
        // Predicted owner shard of each session (id & (S-1)).
        let s = self.o.shards_hint.max(1);
        let mut owners = vec![0u64; s as usize];
        for c in &self.conns {
            if c.st == St::Up {
                owners[(c.core.session_id() & (s - 1)) as usize] += 1;
            }
        }
        for (k, n) in owners.iter().enumerate() {
            let key: &'static str = Box::leak(format!("owner_shard_{k}").into_boxed_str());
            self.count(key, *n);
        }
        let alive = self.up_count() as u64;
        self.count("alive_at_end", alive);
        self.disconnect_all();
        Ok(())
    }

    fn resume_round(&mut self, how: Reconnect) -> Result<(), String> {
        // 1. Unacknowledged output: one DATA per session, wait for its echo, do not ACK it.
        self.mode = Mode::Prime;
        let ups = self.up_list();
        for &i in &ups {
            self.send_ack(i);
            self.send_data(i, Instant::now(), false);
        }
        self.pump_until(Duration::from_secs(60), |w| {
            w.conns.iter().all(|c| c.st != St::Up || c.out.is_empty())
        });
        // 2. One more DATA "just before dropping", then an abrupt close (RST).
        let mut dropped = Vec::new();
        for &i in &ups {
            if self.conns[i].st != St::Up {
                continue;
            }
            if !self.conns[i].out.is_empty() || self.conns[i].echo_seq == 0 {
                self.fail(
                    i,
                    "resume: the priming echo did not come back in 60 s".into(),
                );
                continue;
            }
            self.send_data(i, Instant::now(), false);
            let c = &mut self.conns[i];
            c.late_tag = c.out.back().map(|x| x.0).unwrap_or(0);
            c.out.clear();
            c.resume_last = c.echo_seq.wrapping_sub(1);
            let fd = std::mem::replace(&mut c.fd, -1);
            let qch = c.qch.take();
            c.st = St::Dropped;
            match (qch, self.qep.as_mut()) {
                // QUIC: forget the connection without a word, as a lost network would.
                (Some(ch), Some(q)) => q.close(ch, true),
                _ => sys::close_abort(fd),
            }
            dropped.push(i);
        }
        self.count("dropped", dropped.len() as u64);
        // Let the server see the resets.
        self.pump_until(Duration::from_millis(300), |_| false);
        // The order resumes start in, each with the source it reconnects from and its label.
        let mut plan: Vec<(usize, Option<SocketAddrV4>, &'static str)> = Vec::new();
        match how {
            Reconnect::Fresh => plan.extend(dropped.iter().map(|&i| (i, None, "resume"))),
            Reconnect::Own => {
                plan.extend(dropped.iter().map(|&i| (i, self.conns[i].local, "resume")))
            }
            Reconnect::Interleaved(parity) => {
                // SO_REUSEPORT picks the listener from the 4-tuple, so reconnecting from the
                // previous source address+port of a session owned by shard X lands on X.
                let s = self.o.shards_hint.max(1);
                let mut by_owner: Vec<Vec<usize>> = vec![Vec::new(); s as usize];
                for &i in &dropped {
                    by_owner[(self.conns[i].core.session_id() & (s - 1)) as usize].push(i);
                }
                let mut pair = 0usize;
                loop {
                    let mut owners: Vec<usize> = (0..by_owner.len()).collect();
                    owners.sort_by_key(|&o| std::cmp::Reverse(by_owner[o].len()));
                    let (o1, o2) = match owners.as_slice() {
                        [a, b, ..] if !by_owner[*b].is_empty() => (*a, *b),
                        _ => break,
                    };
                    let (Some(a), Some(b)) = (by_owner[o1].pop(), by_owner[o2].pop()) else {
                        break;
                    };
                    let (la, lb) = (self.conns[a].home, self.conns[b].home);
                    if pair % 2 == parity {
                        plan.push((a, lb, "cross_port"));
                        plan.push((b, la, "cross_port"));
                    } else {
                        plan.push((a, la, "same_port"));
                        plan.push((b, lb, "same_port"));
                    }
                    pair += 1;
                }
                // Sessions left without a partner on another shard reconnect to their own.
                for rest in by_owner {
                    for i in rest {
                        plan.push((i, self.conns[i].home, "same_port"));
                    }
                }
            }
        }
        // 3. RESUME every session from a new connection, `inflight` at a time (a burst), or
        // paced at `--resume-rate` per second (each started on schedule, `inflight` bounding
        // how many may be pending).
        self.mode = Mode::Resume;
        let t = Instant::now();
        let mut next = 0;
        let limit = Duration::from_secs(60 + plan.len() as u64 / 100);
        let pace = (self.o.resume_rate > 0.0).then(|| 1.0 / self.o.resume_rate);
        loop {
            while next < plan.len() && self.resume_inflight < self.o.inflight {
                if let Some(iv) = pace {
                    let due = t + Duration::from_secs_f64(next as f64 * iv);
                    if due > Instant::now() {
                        break;
                    }
                }
                let (i, from, label) = plan[next];
                next += 1;
                let c = &mut self.conns[i];
                c.label = label;
                c.want_replay = true;
                // RESUME claims everything before the unacknowledged echo, so that the server
                // replays it: a core for the session as saved just before that echo.
                let old = &c.core;
                let mut core = ClientCore::for_resume(
                    old.tenant(),
                    old.agent(),
                    old.session_id(),
                    old.resume_token(),
                    c.resume_last,
                    old.next_seq(),
                );
                configure(&mut core, self.o);
                c.core = core;
                self.resume_inflight += 1;
                let src = match from {
                    Some(a) => Src::Exact(a),
                    None => {
                        if label == "cross_port" {
                            self.count("cross_port_unpaired", 1);
                        }
                        self.next_src += 1;
                        Src::Ip(src_ip(self.next_src))
                    }
                };
                if !self.start_conn(i, Hello::Resume, src) {
                    // start_conn marked it dead without going through fail().
                    self.conns[i].want_replay = false;
                    self.resume_inflight -= 1;
                }
            }
            if next == plan.len() && self.resume_inflight == 0 {
                break;
            }
            if t.elapsed() > limit {
                self.count_failure(format!(
                    "resume: gave up after {:.0} s with {} resumes pending",
                    limit.as_secs_f64(),
                    self.resume_inflight
                ));
                break;
            }
            let wait = match pace {
                Some(iv) if next < plan.len() => {
                    let due = t + Duration::from_secs_f64(next as f64 * iv);
                    let w = due.saturating_duration_since(Instant::now());
                    if w <= self.spin {
                        Duration::ZERO
                    } else {
                        (w - self.spin / 2).min(Duration::from_millis(10))
                    }
                }
                _ => Duration::from_millis(10),
            };
            self.poll(wait);
        }
        self.count("round_ms", t.elapsed().as_millis() as u64);
        self.mode = Mode::Open;
        Ok(())
    }

    fn result(&self, err: Option<String>) -> Value {
        let mut hists = Map::new();
        for (k, h) in &self.hists {
            hists.insert(k.clone(), hist_to_json(h));
        }
        for (k, h) in [
            ("latency_us", &self.h_latency),
            ("send_lag_us", &self.h_lag),
            ("session_max_latency_us", &self.h_session_max),
        ] {
            if !h.is_empty() {
                hists.insert(k.to_string(), hist_to_json(h));
            }
        }
        let mut counts = self.counts.clone();
        if let Some(q) = &self.qep {
            if q.send_drops > 0 {
                counts.insert("quic_datagrams_not_sent", q.send_drops);
            }
        }
        for (k, n) in [
            ("sent", self.n_sent),
            ("received", self.n_received),
            ("received_in_window", self.n_in_window),
        ] {
            if n > 0 {
                *counts.entry(k).or_insert(0) += n;
            }
        }
        json!({
            "t": "result",
            "worker": self.idx,
            "error": err,
            "counts": counts,
            "failures": self.failures,
            "other_frames": self.other,
            "hists": hists,
        })
    }
}

/// Entry point of `loadgen --worker I ...`.
pub fn run(o: &Opts, idx: usize) -> i32 {
    let nofile = sys::raise_nofile();
    if (o.sessions as u64) + 64 > nofile {
        out_line(json!({"t": "result", "worker": idx, "error":
            format!("this worker needs {} file descriptors, the limit is {nofile}: use more --workers", o.sessions + 64),
            "counts": {}, "failures": {}, "other_frames": {}, "hists": {}}));
        return 1;
    }
    // Timed waits end within a microsecond of their deadline, not the default 50 µs slack.
    // SAFETY: prctl with integer arguments only.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong) };
    let mut w = match Worker::new(o, idx) {
        Ok(w) => w,
        Err(e) => {
            eprintln!("loadgen worker {idx}: {e}");
            return 1;
        }
    };
    let r = match o.scenario.as_str() {
        "idle" => w.idle(),
        "connect" => w.connect(),
        "echo" | "raw-echo" => w.echo_scenario(),
        "resume" | "resume-cross" => w.resume_scenario(),
        s => Err(format!("unknown scenario {s}")),
    };
    let err = r.err();
    out_line(w.result(err.clone()));
    drop(w);
    i32::from(err.is_some())
}
