//! QUIC on the UDP port, black box: the real `clawtermd` (TLS certificate, several shards,
//! QUIC on an ephemeral port), real `claw-agent` pods, and the project's QUIC client
//! (`clawterm_client::quic`) speaking frames checked by the tests' own decoder.
//!
//! * a session over a QUIC stream: CONNECT, echo, wrong token;
//! * connection migration: the client rebinds to new addresses and ports mid-session and the
//!   session continues on the same stream, with no RESUME and no lost frame, on every shard
//!   (each move lands on the owning shard only if the server steers by connection id);
//! * suspend over QUIC and RESUME over QUIC from a new connection (landing on any shard: the
//!   stream is relayed to the owner when it lands elsewhere) and over TCP/TLS, with exact
//!   replay;
//! * garbage datagrams on the QUIC port do not disturb a live session.

mod common;
use clawterm_testkit as harness;
use clawterm_testkit::tls as tls_support;

use clawterm_client::quic::QuicStream;
use clawterm_client::transport::{client_config, TlsTrust};
use common::{connect_payload, decode, encode, resume_payload, Frame};
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};
use tls_support::{TlsEnv, TENANT, TOKEN};

const CONNECT: u8 = 0x01;
const ACCEPT: u8 = 0x02;
const RESUME: u8 = 0x03;
const RESUMED: u8 = 0x04;
const DATA: u8 = 0x10;
const ACK: u8 = 0x11;
const KEEPALIVE: u8 = 0x20;
const ERROR: u8 = 0xFF;
const FLAG_REPLAY: u8 = 0x01;
const ECHO: &[&str] = &["echo"];

fn tls_config(env: &TlsEnv) -> std::sync::Arc<rustls::ClientConfig> {
    let trust = TlsTrust {
        ca: Some(env.cert.clone()),
        ..TlsTrust::default()
    };
    client_config(&trust, "localhost:7221")
        .expect("TLS client config")
        .0
}

/// A ClawTerm client over one QUIC stream.
struct QClient {
    s: QuicStream,
    sid: u32,
    seq: u32,
    buf: Vec<u8>,
    token: [u8; 16],
    /// Highest server SEQ received.
    last_seq: u32,
}

impl QClient {
    fn open(env: &TlsEnv, steer: Option<u32>, local: Option<SocketAddr>) -> QClient {
        let quic = env.quic.expect("the server listens on QUIC");
        let mut s = QuicStream::connect(
            quic,
            "localhost",
            tls_config(env),
            steer,
            local,
            Duration::from_secs(10),
        )
        .expect("QUIC handshake");
        s.set_read_timeout(Some(Duration::from_secs(10)));
        QClient {
            s,
            sid: 0,
            seq: 0,
            buf: Vec::new(),
            token: [0; 16],
            last_seq: 0,
        }
    }

    fn send(&mut self, typ: u8, payload: &[u8]) -> u32 {
        self.seq += 1;
        let f = encode(self.sid, self.seq, typ, 0, payload);
        self.s.write_all(&f).expect("QUIC write");
        self.s.flush().expect("QUIC flush");
        self.seq
    }

    fn recv(&mut self) -> Frame {
        loop {
            if let Some((f, used)) = decode(&self.buf).expect("well-formed frames") {
                self.buf.drain(..used);
                if f.typ == DATA || f.typ == RESUMED || f.typ == ACCEPT {
                    self.last_seq = self.last_seq.max(f.seq);
                }
                return f;
            }
            let mut b = [0u8; 65536];
            let n = self.s.read(&mut b).expect("QUIC read");
            assert!(n > 0, "stream ended while waiting for a frame");
            self.buf.extend_from_slice(&b[..n]);
        }
    }

    /// The next frame that is not a KEEPALIVE or ACK.
    fn recv_app(&mut self) -> Frame {
        loop {
            let f = self.recv();
            if f.typ != KEEPALIVE && f.typ != ACK {
                return f;
            }
        }
    }

    fn connect_session(&mut self, token: &[u8; 32]) -> Frame {
        self.send(CONNECT, &connect_payload(1, 0x01, TENANT, 1, token));
        let f = self.recv_app();
        if f.typ == ACCEPT {
            self.sid = f.sid;
            self.token.copy_from_slice(&f.payload[6..22]);
        }
        f
    }

    fn echo(&mut self, payload: &[u8]) {
        self.send(DATA, payload);
        let f = self.recv_app();
        assert_eq!(f.typ, DATA, "{f:?}");
        assert_eq!(f.payload, payload);
        self.send(ACK, &[]);
    }
}

#[test]
fn session_over_a_quic_stream() {
    let env = TlsEnv::start_quic(&[(1, ECHO)], 2, "info");
    let mut c = QClient::open(&env, None, None);
    let accept = c.connect_session(&TOKEN);
    assert_eq!(accept.typ, ACCEPT, "{accept:?}");
    for i in 0..200u32 {
        c.echo(format!("quic frame {i}").as_bytes());
    }
    // A wrong token on another stream of another connection: AUTH_FAILED, stream ends.
    let mut bad = QClient::open(&env, None, None);
    let f = bad.connect_session(&[0x11; 32]);
    assert_eq!(f.typ, ERROR);
    assert_eq!(u16::from_be_bytes([f.payload[0], f.payload[1]]), 3, "{f:?}");
    let mut rest = [0u8; 64];
    assert_eq!(
        bad.s.read(&mut rest).expect("clean end"),
        0,
        "stream finished"
    );
    // The first session is untouched.
    c.echo(b"still here");
}

#[test]
fn migration_to_new_addresses_keeps_the_session_without_resume() {
    for shards in [2u32, 4] {
        let env = TlsEnv::start_with(
            &[(1, ECHO)],
            shards,
            "info",
            &["--quic-port", "0", "--admin", "127.0.0.1:0"],
        );
        assert!(
            env.wait_log("(steered by connection id)", Duration::from_secs(5)),
            "the steering program is attached"
        );
        let mut c = QClient::open(&env, None, None);
        assert_eq!(c.connect_session(&TOKEN).typ, ACCEPT);
        let sid = c.sid;
        let mut sent = 0u32;
        for hop in 0..10u8 {
            // A new source address and port each time (127.0.0.2 … 127.0.0.11): with a
            // 4-tuple hash these would land on a random shard; steering keeps them home.
            let local = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + hop)), 0);
            let now_at = c.s.rebind(local).expect("rebind");
            assert_eq!(now_at.ip(), local.ip());
            for _ in 0..20 {
                c.echo(format!("hop {hop} frame {sent}").as_bytes());
                sent += 1;
            }
        }
        assert_eq!(c.sid, sid, "same session");
        assert!(c.s.lost().is_none(), "connection kept: {:?}", c.s.lost());
        assert!(
            !env.log_contains("QUIC connection lost"),
            "the server lost the connection while it moved"
        );
        // Every datagram reached the connection's shard through the kernel's steering; none
        // had to be forwarded between shards.
        assert_eq!(env.metric_sum("clawterm_quic_forwarded_total"), 0.0);
        // The gauge is refreshed every second.
        let deadline = Instant::now() + Duration::from_secs(5);
        while env.metric_sum("clawterm_quic_connections") != 1.0 {
            assert!(Instant::now() < deadline, "one QUIC connection on the node");
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("{shards} shards: {sent} echoes over 10 address changes, no RESUME");
    }
}

/// Suspends over QUIC (the client closes its connection), then resumes from a new QUIC
/// connection `tries` times without steering (so some land on another shard and are relayed)
/// and once with steering, and once over TCP/TLS: each RESUMED is followed by exactly the
/// frames the client had not acknowledged.
#[test]
fn suspend_over_quic_and_resume_anywhere_with_exact_replay() {
    let env = TlsEnv::start_quic(&[(1, ECHO)], 2, "clawterm=debug");
    let mut c = QClient::open(&env, None, None);
    assert_eq!(c.connect_session(&TOKEN).typ, ACCEPT);
    let (sid, token) = (c.sid, c.token);
    let mut seq = c.seq;
    // Output the client never acknowledges: it must be replayed.
    for i in 0..5u32 {
        c.send(DATA, format!("unacked {i}").as_bytes());
        let f = c.recv_app();
        assert_eq!(f.payload, format!("unacked {i}").as_bytes());
    }
    let last_seq = 0; // nothing acknowledged: ask for everything
    c.s.close();
    drop(c);
    // Every DATA the server sent and the client never acknowledged, in order: each RESUMED
    // (asking for everything, last_seq 0) must replay exactly these, flagged REPLAY.
    let mut expect: Vec<Vec<u8>> = (0..5u32)
        .map(|i| format!("unacked {i}").into_bytes())
        .collect();
    let check_replay = |f: &Frame, replayed: &[Frame], expect: &[Vec<u8>]| {
        assert_eq!(f.typ, RESUMED, "{f:?}");
        assert_eq!(f.sid, sid);
        let first = u32::from_be_bytes(f.payload[8..12].try_into().unwrap());
        assert!(first > 0, "a replay follows");
        assert_eq!(replayed.len(), expect.len());
        for (r, want) in replayed.iter().zip(expect) {
            assert_eq!(r.typ, DATA);
            assert_eq!(r.flags & FLAG_REPLAY, FLAG_REPLAY, "{r:?}");
            assert_eq!(&r.payload, want);
        }
    };
    let mut relayed_before = env.count_in_log("QUIC resume relayed to the owning shard");
    let mut relays_seen = 0;
    for attempt in 0..8 {
        // Wait (bounded) until the server has noticed the previous connection went away.
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut r = loop {
            let mut r = QClient::open(&env, if attempt == 7 { Some(sid) } else { None }, None);
            r.sid = sid;
            r.seq = seq;
            r.send(RESUME, &resume_payload(sid, last_seq, &token));
            let f = r.recv_app();
            if f.typ == RESUMED {
                let replayed: Vec<Frame> = (0..expect.len()).map(|_| r.recv_app()).collect();
                check_replay(&f, &replayed, &expect);
                break r;
            }
            assert!(Instant::now() < deadline, "no RESUMED: {f:?}");
            std::thread::sleep(Duration::from_millis(50));
        };
        // The session works after the resume (the echo is not acknowledged either: an empty
        // ACK would acknowledge the oldest replayed frame), then the client leaves again.
        let live = format!("after resume {attempt}").into_bytes();
        r.send(DATA, &live);
        let echo = r.recv_app();
        assert_eq!(echo.payload, live, "{echo:?}");
        expect.push(live);
        seq = r.seq;
        let relayed = env.count_in_log("QUIC resume relayed to the owning shard");
        if relayed > relayed_before {
            relays_seen += 1;
        }
        relayed_before = relayed;
        r.s.close();
    }
    eprintln!("8 QUIC resumes, {relays_seen} relayed across shards");
    // Finally over TCP with TLS: the same session, the same replay.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (f, replayed) = tls_resume(&env, sid, last_seq, &token, seq + 1, expect.len());
        if f.typ == RESUMED {
            check_replay(&f, &replayed, &expect);
            break;
        }
        assert!(Instant::now() < deadline, "no RESUMED over TLS: {f:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// RESUME over TCP with TLS; returns the answer and, after a RESUMED, the `n` frames after it.
fn tls_resume(
    env: &TlsEnv,
    sid: u32,
    last_seq: u32,
    token: &[u8; 16],
    seq: u32,
    n: usize,
) -> (Frame, Vec<Frame>) {
    let sock = std::net::TcpStream::connect(env.addr).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let conn = rustls::ClientConnection::new(tls_config(env), name).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, sock);
    tls.write_all(&encode(
        sid,
        seq,
        RESUME,
        0,
        &resume_payload(sid, last_seq, token),
    ))
    .unwrap();
    let mut buf = Vec::new();
    let mut frames: Vec<Frame> = Vec::new();
    while frames.is_empty() || (frames[0].typ == RESUMED && frames.len() < n + 1) {
        if let Some((f, used)) = decode(&buf).expect("well-formed frames") {
            buf.drain(..used);
            if f.typ != KEEPALIVE && f.typ != ACK {
                frames.push(f);
            }
            continue;
        }
        let mut b = [0u8; 16384];
        let n = tls.read(&mut b).expect("TLS read");
        assert!(n > 0, "closed while waiting for frames");
        buf.extend_from_slice(&b[..n]);
    }
    let first = frames.remove(0);
    (first, frames)
}

#[test]
fn garbage_datagrams_do_not_disturb_a_live_session() {
    let env = TlsEnv::start_quic(&[(1, ECHO)], 2, "info");
    let quic = env.quic.unwrap();
    let mut c = QClient::open(&env, None, None);
    assert_eq!(c.connect_session(&TOKEN).typ, ACCEPT);
    let junk = UdpSocket::bind("127.0.0.1:0").unwrap();
    for i in 0..3000u32 {
        let len = 1 + (i as usize * 37) % 1400;
        let mut d: Vec<u8> = (0..len)
            .map(|x| (x as u32).wrapping_mul(2654435761).wrapping_add(i) as u8)
            .collect();
        // Every kind of first byte: short and long headers, some naming our shards.
        d[0] = i as u8;
        let _ = junk.send_to(&d, quic);
        if i % 100 == 0 {
            c.echo(format!("during junk {i}").as_bytes());
        }
    }
    c.echo(b"after the junk");
    assert!(c.s.lost().is_none());
}

/// The client library over QUIC: a `quic://` endpoint, echo, a dropped connection that the
/// session reconnects over QUIC by itself (RESUME steered to the owning shard) with nothing
/// lost or doubled, and credentials that say `quic://`.
#[test]
fn client_session_over_quic_reconnects_by_itself() {
    use clawterm_client::{Event, Options, Session};
    let env = TlsEnv::start_quic(&[(1, ECHO)], 2, "clawterm=debug");
    let quic = env.quic.unwrap();
    let endpoint = format!(
        "quic://127.0.0.1:{}?ca={}&name=localhost",
        quic.port(),
        env.cert.display()
    );
    let mut s = Session::connect_with(&endpoint, TENANT, 1, TOKEN, Options::default())
        .expect("session over QUIC");
    assert_eq!(
        s.tls_info().map(|t| t.0),
        Some("QUIC (TLS 1.3)".to_string())
    );
    let mut got = Vec::new();
    let mut expect = Vec::new();
    let mut reconnected = 0;
    for round in 0..4 {
        for i in 0..50 {
            let line = format!("round {round} line {i}\n");
            expect.extend_from_slice(line.as_bytes());
            s.send(line.as_bytes()).unwrap();
        }
        if round < 3 {
            // The network "drops": the session reconnects over QUIC and resumes.
            s.drop_connection("test cut");
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while got.len() < expect.len() {
            assert!(
                Instant::now() < deadline,
                "round {round}: {} of {} bytes",
                got.len(),
                expect.len()
            );
            match s.recv(Duration::from_millis(200)).expect("session alive") {
                Some(Event::Data(d)) => got.extend_from_slice(&d),
                Some(Event::Reconnected { .. }) => reconnected += 1,
                Some(Event::Gap) => panic!("nothing may be lost"),
                _ => {}
            }
        }
    }
    assert_eq!(got, expect, "every byte once, in order");
    assert_eq!(reconnected, 3);
    let creds = s.credentials("q");
    assert!(creds.endpoint.starts_with("quic://"), "{}", creds.endpoint);
    // The resumes were steered to the owning shard: none relayed.
    assert_eq!(
        env.count_in_log("QUIC resume relayed to the owning shard"),
        0,
        "a steered QUIC RESUME lands on the owner"
    );
    s.end();
}

/// The CLI over QUIC: `clawterm connect --quic --ca CERT` echoes, saves `"transport": "quic"`,
/// and the saved session resumes over QUIC, then over TLS/TCP with `resume --tcp`.
#[test]
fn cli_connect_and_resume_over_quic() {
    use std::process::{Command, Stdio};
    let env = TlsEnv::start_quic(&[(1, ECHO)], 2, "info");
    let quic = env.quic.unwrap();
    let state = tls_support::TempDir::new("qstate");
    let log = state.0.join("out.log");
    let cli = |args: &[&str], input: &str| {
        let mut child = Command::new(env!("CARGO_BIN_EXE_clawterm"))
            .args(args)
            .env("CLAWTERM_STATE_DIR", &state.0)
            .env_remove("CLAWTERM_TOKEN")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(input.as_bytes()).unwrap();
        (child, stdin)
    };
    let wait_echo = |what: &[u8]| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !std::fs::read(&log).is_ok_and(|d| tls_support::contains(&d, what)) {
            assert!(
                Instant::now() < deadline,
                "no echo of {:?}",
                String::from_utf8_lossy(what)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let stop = |child: std::process::Child, stdin| {
        harness::signal(child.id(), libc::SIGTERM);
        let out = child.wait_with_output().unwrap();
        drop(stdin);
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    let host = format!("localhost:{}", quic.port());
    let tok = tls_support::hex(&TOKEN);
    let cert = env.cert.to_str().unwrap().to_string();
    let logs = log.to_str().unwrap().to_string();
    let (child, stdin) = cli(
        &[
            "connect", &host, "--quic", "--ca", &cert, "--tenant", "7", "--agent", "1", "--token",
            &tok, "--name", "q1", "--log", &logs,
        ],
        "over-quic\n",
    );
    wait_echo(b"over-quic\n");
    let err = stop(child, stdin);
    assert!(err.contains("QUIC"), "the client says it uses QUIC: {err}");
    let json = std::fs::read_to_string(state.0.join("sessions/q1.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["transport"], "quic", "{json}");
    // Resume over QUIC (saved transport).
    let (child, stdin) = cli(&["resume", "q1", "--log", &logs], "again-quic\n");
    wait_echo(b"again-quic\n");
    stop(child, stdin);
    // The same session over TLS on TCP: the port moves to the TCP one given here.
    let json = std::fs::read_to_string(state.0.join("sessions/q1.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&json).unwrap();
    v["endpoint"] = serde_json::Value::String(format!("localhost:{}", env.addr.port()));
    std::fs::write(state.0.join("sessions/q1.json"), v.to_string()).unwrap();
    let (child, stdin) = cli(&["resume", "q1", "--tcp", "--log", &logs], "then-tls\n");
    wait_echo(b"then-tls\n");
    let err = stop(child, stdin);
    assert!(err.contains("TLSv1_3"), "{err}");
    let d = std::fs::read(&log).unwrap();
    assert_eq!(tls_support::count(&d, b"over-quic\n"), 1);
    assert_eq!(tls_support::count(&d, b"again-quic\n"), 1);
}

/// Memory for QUIC connections that never carry a session is bounded: at most
/// `--max-pending-handshakes` connections without a stream per shard (more are refused), and
/// each is closed after `--handshake-timeout` without one, even if the client keeps it alive.
#[test]
fn connections_without_a_session_are_bounded_and_closed() {
    let env = TlsEnv::start_with(
        &[(1, ECHO)],
        1,
        "info",
        &[
            "--quic-port",
            "0",
            "--max-pending-handshakes",
            "4",
            "--handshake-timeout",
            "1",
        ],
    );
    let quic = env.quic.unwrap();
    let open = || {
        QuicStream::connect(
            quic,
            "localhost",
            tls_config(&env),
            None,
            None,
            Duration::from_secs(3),
        )
    };
    // Four empty connections are accepted; a fifth is refused while they exist.
    let mut idle: Vec<QuicStream> = (0..4).map(|_| open().expect("within the limit")).collect();
    // The limit is recounted once a second; give it a moment to see all four.
    std::thread::sleep(Duration::from_millis(1200));
    let fifth = open();
    assert!(
        fifth.is_err(),
        "a fifth stream-less connection was accepted"
    );
    // Within the handshake timeout (+ the once-a-second sweep) the server closes them all,
    // although the clients keep their connections alive.
    let deadline = Instant::now() + Duration::from_secs(5);
    while idle.iter().any(|q| q.lost().is_none()) {
        assert!(
            Instant::now() < deadline,
            "empty connections were not closed"
        );
        for q in idle.iter_mut() {
            let _ = q.drive();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // Then (once the next sweep has recounted) a real session connects fine.
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut s = loop {
        match open() {
            Ok(s) => break s,
            Err(e) => assert!(Instant::now() < deadline, "refused after the sweep: {e}"),
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    s.set_read_timeout(Some(Duration::from_secs(10)));
    let mut c = QClient {
        s,
        sid: 0,
        seq: 0,
        buf: Vec::new(),
        token: [0; 16],
        last_seq: 0,
    };
    assert_eq!(c.connect_session(&TOKEN).typ, ACCEPT);
    c.echo(b"after the empty ones");
    // Connections that open their session right away leave the count at once: a quick
    // succession of three times the limit is not refused (the limit is on empty connections,
    // not a rate).
    let sessions: Vec<QClient> = (0..12)
        .map(|i| {
            let mut q = QClient::open(&env, None, None);
            let f = q.connect_session(&TOKEN);
            assert_eq!(f.typ, ACCEPT, "session {i}: {f:?}");
            q
        })
        .collect();
    assert_eq!(sessions.len(), 12);
}
