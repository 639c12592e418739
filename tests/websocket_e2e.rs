//! The WebSocket port (`--ws-port`, issue 16) against a real `clawtermd` and a real echo pod:
//! sessions over WebSocket with the same handshake, replay and take-over as TCP; a session
//! moving between TCP and WebSocket connections by RESUME (on both backends, one and two
//! shards: a RESUME landing on another shard hands the WebSocket over with its state); the
//! page and the HTTP refusals; hostile WebSocket input while a live session keeps its echo
//! latency; a `tungstenite` client and TLS (wss).

mod common;
mod ws_support;
use clawterm_testkit as harness;

use common::*;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use ws_support::{close_of, frame, http, open, read_frame, Bridge};

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn ws_of(env: &Env) -> SocketAddr {
    env.server
        .ws
        .expect("the server reports its WebSocket port")
}

/// A session made over WebSocket goes on over TCP and back, with exact replay each time, and a
/// RESUME over WebSocket takes a TCP-attached session over.
#[test]
fn a_session_moves_between_tcp_and_websocket_with_exact_replay() {
    for_each_config(|cfg| {
        let env = Env::start(cfg, &[]);
        let bridge = Bridge::start(ws_of(&env));
        for round in 0..6u32 {
            // CONNECT over WebSocket, echo, lose the connection with echoes in flight.
            let mut c = Client::connect(bridge.addr);
            let (sid, token) = c.connect_session(TENANT, AGENT, &TOKEN);
            for i in 0..20u32 {
                let p = format!("r{round}-ws-{i}");
                assert_eq!(c.echo(p.as_bytes()), 2 + i, "round {round}");
            }
            let last_seen = c.last_seq;
            let mut bytes = Vec::new();
            let mut missed = Vec::new();
            for i in 0..10u32 {
                let p = format!("r{round}-lost-{i}-{}", "z".repeat(i as usize * 100));
                bytes.extend(c.next_frame_bytes(DATA, p.as_bytes()).1);
                missed.push(p.into_bytes());
            }
            c.send_raw(&bytes);
            let client_seq = c.tx_seq;
            std::thread::sleep(ms(100));
            c.drop_abruptly();
            std::thread::sleep(ms(50));
            // RESUME over TCP: exactly the missed echoes, in order.
            let mut t = env.client();
            t.tx_seq = client_seq;
            let r = t.resume(sid, last_seen, &token);
            assert_eq!(r.first_replay_seq, last_seen + 1, "round {round}: {r:?}");
            for p in &missed {
                let f = t.recv_frame();
                assert_eq!((f.typ, f.flags), (DATA, F_REPLAY), "round {round}: {f:?}");
                assert_eq!(&f.payload, p, "round {round}");
            }
            t.expect_silence(ms(30));
            assert_eq!(t.echo(b"tcp-live"), r.seq + 1);
            // A RESUME over WebSocket takes the TCP connection's place.
            let mut w = Client::connect(bridge.addr);
            w.tx_seq = t.tx_seq;
            let r2 = w.resume(sid, t.last_seq, &token);
            assert_eq!(r2.flags, 0, "round {round}: {r2:?}");
            t.expect_error(E_TAKEN_OVER);
            assert_eq!(w.echo(b"ws-live"), r2.seq + 1, "round {round}");
        }
    });
}

/// The page, and every refusal with its status and reason.
#[test]
fn the_page_is_served_and_bad_requests_are_refused_with_a_reason() {
    let env = Env::start(CONFIGS[0], &[]);
    let ws = ws_of(&env);
    let page = http(ws, "GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(page.starts_with("HTTP/1.1 200 OK\r\n"), "{page}");
    assert!(page.contains("Content-Type: text/html"), "{page}");
    assert!(page.contains("<html"), "{page}");
    for (req, status, reason) in [
        ("GET /nope HTTP/1.1\r\n\r\n".to_string(), 404, "not found"),
        ("POST / HTTP/1.1\r\nContent-Length: 0\r\n\r\n".into(), 405, "method"),
        ("GET /ws HTTP/1.1\r\nHost: x\r\n\r\n".into(), 426, "upgrade to websocket"),
        ("garbage\x00\x01\x02\r\n\r\n".into(), 400, "malformed"),
        (
            format!("GET /ws HTTP/1.1\r\nHost: {ws}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nOrigin: https://evil.example\r\n\r\n"),
            403,
            "origin",
        ),
        (format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(9000)), 431, "too large"),
    ] {
        let resp = http(ws, &req);
        assert!(resp.starts_with(&format!("HTTP/1.1 {status} ")), "{req:?} → {resp}");
        assert!(resp.contains(reason), "{req:?} → {resp}");
    }
    // The page's own origin may open a WebSocket.
    open(ws, &format!("Origin: http://{ws}\r\n")).expect("same-origin upgrade");
}

/// Echo round trip over a raw WebSocket (CONNECT, then DATA as binary messages).
struct Live {
    s: std::net::TcpStream,
    sid: u32,
    seq: u32,
    buf: Vec<u8>,
}

impl Live {
    fn start(ws: SocketAddr) -> Live {
        let mut s = open(ws, "").expect("open");
        let connect = encode(
            0,
            1,
            CONNECT,
            0,
            &connect_payload(1, 0x03, TENANT, AGENT, &TOKEN),
        );
        s.write_all(&frame(0x2, true, &connect, true)).unwrap();
        let mut l = Live {
            s,
            sid: 0,
            seq: 1,
            buf: Vec::new(),
        };
        let f = l.next();
        assert_eq!(f.typ, ACCEPT, "{f:?}");
        l.sid = f.sid;
        l
    }

    fn next(&mut self) -> Frame {
        loop {
            if let Some((f, n)) = decode(&self.buf).expect("a valid frame") {
                self.buf.drain(..n);
                return f;
            }
            let (_, op, p) = read_frame(&mut self.s).expect("the live WebSocket ended");
            assert!(op == 0x2 || op == 0x0, "opcode {op}");
            self.buf.extend_from_slice(&p);
        }
    }

    /// One echo: its round trip.
    fn echo(&mut self, payload: &[u8]) -> Duration {
        self.seq += 1;
        let t0 = Instant::now();
        let f = encode(self.sid, self.seq, DATA, 0, payload);
        self.s.write_all(&frame(0x2, true, &f, true)).unwrap();
        loop {
            let f = self.next();
            if f.typ == DATA {
                assert_eq!(f.payload, payload);
                let ack = encode(self.sid, 0, ACK, 0, &f.seq.to_be_bytes());
                self.s.write_all(&frame(0x2, true, &ack, true)).unwrap();
                return t0.elapsed();
            }
        }
    }
}

/// Hostile clients of the WebSocket port are closed with the code of the rule they broke,
/// slow ones at the handshake deadline, floods are absorbed — and a live session's echoes keep
/// their latency meanwhile.
#[test]
fn hostile_websocket_input_is_refused_while_a_live_session_keeps_its_latency() {
    let mut env = Env::start(
        CONFIGS[0],
        &["--handshake-timeout", "1", "--ws-max-message", "65536"],
    );
    let ws = ws_of(&env);
    let mut live = Live::start(ws);
    let mut before = Vec::new();
    for i in 0..50 {
        before.push(live.echo(format!("before-{i}").as_bytes()));
    }
    let attack = std::thread::spawn(move || {
        let mut closes = Vec::new();
        // Rules broken after the upgrade: (what, bytes, expected close code).
        let cases: Vec<(&str, Vec<u8>, u16)> = vec![
            ("unmasked", frame(0x2, true, b"x", false), 1002),
            ("text", frame(0x1, true, b"hello", true), 1003),
            (
                "oversized",
                frame(0x2, true, &vec![0u8; 70_000], true),
                1009,
            ),
            ("reserved opcode", frame(0x3, true, b"", true), 1002),
            ("fragmented ping", frame(0x9, false, b"", true), 1002),
        ];
        for (what, bytes, code) in cases {
            let mut s = open(ws, "").unwrap();
            let _ = s.write_all(&bytes);
            let got = close_of(&mut s);
            assert_eq!(got.as_ref().map(|c| c.0), Some(code), "{what}: {got:?}");
            closes.push(what);
        }
        // Garbage ClawTerm bytes inside valid messages: a protocol ERROR frame, then the close.
        let mut s = open(ws, "").unwrap();
        s.write_all(&frame(0x2, true, &[0x55; 64], true)).unwrap();
        let (_, op, p) = read_frame(&mut s).expect("an ERROR frame");
        assert_eq!(op, 0x2);
        let (f, _) = decode(&p).unwrap().unwrap();
        assert_eq!(f.typ, ERROR, "{f:?}");
        // Garbage instead of HTTP, and a slowloris head: both end, the slow one at the deadline.
        let resp = http(ws, "\u{16}\u{3}\u{1}\u{2}\u{0}\r\n\r\n");
        assert!(resp.starts_with("HTTP/1.1 400 "), "{resp}");
        let mut slow = std::net::TcpStream::connect(ws).unwrap();
        slow.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let t0 = Instant::now();
        let mut ended = false;
        for b in b"GET /ws HTTP/1.1\r\nHost: slow\r\n"
            .iter()
            .cycle()
            .take(40)
        {
            if slow.write_all(&[*b]).is_err() {
                ended = true;
                break;
            }
            std::thread::sleep(ms(100));
            let mut x = [0u8; 1];
            slow.set_nonblocking(true).unwrap();
            let r = slow.read(&mut x);
            slow.set_nonblocking(false).unwrap();
            if matches!(r, Ok(0))
                || matches!(&r, Err(e) if e.kind() != std::io::ErrorKind::WouldBlock)
            {
                ended = true;
                break;
            }
        }
        assert!(
            ended,
            "a slowloris head was kept open for {:?}",
            t0.elapsed()
        );
        assert!(t0.elapsed() < Duration::from_secs(4), "{:?}", t0.elapsed());
        // Floods: 200 pings on one connection (200 pongs), and 100 connections opened and
        // dropped.
        let mut f = open(ws, "").unwrap();
        let mut burst = Vec::new();
        for _ in 0..200 {
            burst.extend(frame(0x9, true, b"p", true));
        }
        f.write_all(&burst).unwrap();
        let mut pongs = 0;
        while pongs < 200 {
            let (_, op, _) = read_frame(&mut f).expect("pongs");
            if op == 0xA {
                pongs += 1;
            }
        }
        for _ in 0..100 {
            let s = open(ws, "").unwrap();
            drop(s);
        }
        closes.len()
    });
    let mut during = Vec::new();
    let mut i = 0;
    while !attack.is_finished() && i < 2000 {
        during.push(live.echo(format!("during-{i}").as_bytes()));
        i += 1;
    }
    assert_eq!(attack.join().expect("the attacks behaved as expected"), 5);
    for i in 0..50 {
        during.push(live.echo(format!("after-{i}").as_bytes()));
    }
    before.sort();
    during.sort();
    let p99 = |v: &Vec<Duration>| v[(v.len() * 99 / 100).min(v.len() - 1)];
    eprintln!(
        "live echo p99 before {:?}, during the attacks {:?} ({} echoes), max {:?}",
        p99(&before),
        p99(&during),
        during.len(),
        during.last()
    );
    // A generous bound (this is a correctness test, not a benchmark): no echo waited on the
    // attackers' work for long.
    assert!(
        *during.last().unwrap() < Duration::from_secs(1),
        "{:?}",
        during.last()
    );
    assert!(env.server.alive(), "the server survived");
}

/// A well-kept client library (`tungstenite`) interoperates: subprotocol, binary messages.
#[test]
fn a_tungstenite_client_interoperates() {
    let env = Env::start(CONFIGS[0], &[]);
    let ws = ws_of(&env);
    let req = tungstenite::client::IntoClientRequest::into_client_request(format!("ws://{ws}/ws"))
        .unwrap();
    let mut req = req;
    req.headers_mut()
        .insert("Sec-WebSocket-Protocol", "clawterm".parse().unwrap());
    let stream = std::net::TcpStream::connect(ws).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let (mut sock, resp) = tungstenite::client(req, stream).expect("handshake");
    assert_eq!(
        resp.headers()
            .get("Sec-WebSocket-Protocol")
            .map(|v| v.as_bytes()),
        Some(&b"clawterm"[..])
    );
    let connect = encode(
        0,
        1,
        CONNECT,
        0,
        &connect_payload(1, 0x03, TENANT, AGENT, &TOKEN),
    );
    sock.send(tungstenite::Message::binary(connect)).unwrap();
    let mut buf = Vec::new();
    let mut frames = Vec::new();
    while frames.is_empty() {
        let m = sock.read().unwrap();
        buf.extend_from_slice(&m.into_data());
        while let Some((f, n)) = decode(&buf).unwrap() {
            buf.drain(..n);
            frames.push(f);
        }
    }
    assert_eq!(frames[0].typ, ACCEPT);
    let sid = frames[0].sid;
    // A DATA frame split over three messages.
    let data = encode(sid, 2, DATA, 0, b"split across messages");
    for part in [&data[..5], &data[5..20], &data[20..]] {
        sock.send(tungstenite::Message::binary(part.to_vec()))
            .unwrap();
    }
    let f = loop {
        let m = sock.read().unwrap();
        buf.extend_from_slice(&m.into_data());
        if let Some((f, n)) = decode(&buf).unwrap() {
            buf.drain(..n);
            if f.typ == DATA {
                break f;
            }
        }
    };
    assert_eq!(f.payload, b"split across messages");
    sock.close(None).unwrap();
    // The close handshake completes.
    loop {
        match sock.read() {
            Ok(_) => {}
            Err(tungstenite::Error::ConnectionClosed) => break,
            Err(e) => panic!("{e}"),
        }
    }
}

/// A wss stream over TLS 1.3 trusting `cert`, opened at `ws` (`/ws`).
fn wss(
    ws: SocketAddr,
    cert: &std::path::Path,
) -> tungstenite::WebSocket<rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_file_iter(cert).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let cfg = std::sync::Arc::new(
        rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth(),
    );
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let conn = rustls::ClientConnection::new(cfg, name).unwrap();
    let tcp = std::net::TcpStream::connect(ws).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let tls = rustls::StreamOwned::new(conn, tcp);
    tungstenite::client(format!("wss://localhost:{}/ws", ws.port()), tls)
        .expect("wss handshake")
        .0
}

/// Frames from a WebSocket through the first one of type `typ`.
fn frames_until<S: Read + Write>(
    sock: &mut tungstenite::WebSocket<S>,
    buf: &mut Vec<u8>,
    typ: u8,
) -> Vec<Frame> {
    let mut out = Vec::new();
    loop {
        while let Some((f, n)) = decode(buf).unwrap() {
            buf.drain(..n);
            let done = f.typ == typ;
            out.push(f);
            if done {
                return out;
            }
        }
        let m = sock.read().expect("the WebSocket ended");
        buf.extend_from_slice(&m.into_data());
    }
}

/// A session made over QUIC (the client library) is resumed over wss with exact replay: the
/// output produced while it was away comes back once, as REPLAY.
#[test]
fn a_quic_session_resumes_over_wss_with_exact_replay() {
    use clawterm_client::{Event, Options, Session};
    let env = harness::tls::TlsEnv::start_quic(&[(1, &["echo"])], 2, "info");
    let quic = env.quic.expect("QUIC port");
    let endpoint = format!(
        "quic://127.0.0.1:{}?ca={}&name=localhost",
        quic.port(),
        env.cert.display()
    );
    let mut s = Session::connect_with(
        &endpoint,
        harness::tls::TENANT,
        1,
        harness::tls::TOKEN,
        Options::default(),
    )
    .expect("session over QUIC");
    s.send(b"over quic").unwrap();
    let mut got = Vec::new();
    while got.len() < 9 {
        if let Some(Event::Data(d)) = s.recv(Duration::from_millis(200)).unwrap() {
            got.extend_from_slice(&d);
        }
    }
    assert_eq!(got, b"over quic");
    // Its echo is produced but never read by this client: the detach (SUSPEND) leaves it in
    // the replay ring, and the RESUME over wss says the client does not have it.
    s.send(b"missed while away").unwrap();
    std::thread::sleep(ms(300));
    let creds = s.detach();
    let mut sock = wss(env.ws.expect("wss port"), &env.cert);
    let mut p = creds.session_id.to_be_bytes().to_vec();
    p.extend_from_slice(&creds.last_seq.to_be_bytes());
    p.extend_from_slice(&creds.resume_token);
    let resume = encode(creds.session_id, creds.next_seq, RESUME, 0, &p);
    sock.send(tungstenite::Message::binary(resume)).unwrap();
    let mut buf = Vec::new();
    let fs = frames_until(&mut sock, &mut buf, RESUMED);
    assert_eq!(fs.last().unwrap().typ, RESUMED, "{fs:?}");
    let replay = frames_until(&mut sock, &mut buf, DATA);
    let f = replay.last().unwrap();
    assert_eq!(f.flags & F_REPLAY, F_REPLAY, "{f:?}");
    assert_eq!(f.payload, b"missed while away");
}

/// With a certificate the WebSocket port speaks TLS 1.3 (wss), the same certificate as TCP.
#[test]
fn wss_with_the_servers_certificate() {
    let env = harness::tls::TlsEnv::start(&[(1, &["echo"])], 1, "info");
    let ws = env.ws.expect("wss port");
    let mut sock = wss(ws, &env.cert);
    let connect = encode(
        0,
        1,
        CONNECT,
        0,
        &connect_payload(1, 0x03, harness::tls::TENANT, 1, &harness::tls::TOKEN),
    );
    sock.send(tungstenite::Message::binary(connect)).unwrap();
    let m = sock.read().unwrap();
    let (f, _) = decode(&m.into_data()).unwrap().unwrap();
    assert_eq!(f.typ, ACCEPT, "{f:?}");
    assert_eq!(
        sock.get_ref().conn.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    // Plain HTTP on the TLS port is not served.
    let mut raw = std::net::TcpStream::connect(ws).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    raw.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    let mut out = Vec::new();
    let _ = raw.read_to_end(&mut out);
    assert!(!String::from_utf8_lossy(&out).contains("200 OK"));
}
