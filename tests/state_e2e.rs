//! Sessions outliving the `clawtermd` process (`--state-dir`, docs/STATE.md), with real
//! `clawtermd` and `claw-agent` processes: a restart after SIGTERM and after SIGKILL brings
//! every session back with exact replay, and a state dir that cannot be used is refused with a
//! clear error.

use clawterm_testkit as harness;
mod pods_support;

use clawterm::proto::{FrameType, FLAG_GAP, FLAG_REPLAY};
use harness::{signal, wait_timeout};
use pods_support::*;
use std::path::Path;
use std::time::Duration;

fn start(io: &str, shards: usize, sock: &Path, state: &Path) -> Server {
    Server::start(
        io,
        shards,
        sock,
        &[
            "--state-dir",
            state.to_str().unwrap(),
            "--agent-grace",
            "30",
        ],
    )
}

/// Stops the server with `sig` and waits (bounded) for it to exit.
fn stop_with(mut srv: Server, sig: libc::c_int) {
    signal(srv.pid(), sig);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while srv.alive() {
        assert!(
            std::time::Instant::now() < deadline,
            "clawtermd still running 10 s after signal {sig}"
        );
        std::thread::sleep(ms(10));
    }
}

/// Echo sessions, each with output its client received but never acknowledged, and one
/// suspended; the daemon goes (SIGTERM or SIGKILL) and a new one starts on the same state dir:
/// every session resumes with exactly the frames it had not acknowledged, numbered as before,
/// and echoes again (the pod got REOPEN).
fn restart_keeps_sessions(sig: libc::c_int) {
    for io in ["epoll", "uring"] {
        let dir = TempDir::with_sock("restart");
        let state = dir.0.join("state");
        let _agent = AgentProc::echo(&dir.sock(), TENANT, AGENT);
        let srv = start(io, 2, &dir.sock(), &state);
        let mut sessions = Vec::new();
        for i in 0..8u32 {
            let mut c = srv.session(AGENT);
            // Acknowledged: must not come back.
            c.send_data(format!("acked-{i}").as_bytes());
            let f = c.recv();
            assert_eq!(f.ty, FrameType::Data);
            c.ack(f.seq);
            let acked_seq = f.seq;
            // Received, never acknowledged: must be replayed.
            let mut pending = Vec::new();
            for k in 0..3 {
                let msg = format!("pending-{i}-{k}");
                c.send_data(msg.as_bytes());
                let f = c.recv();
                assert_eq!(f.ty, FrameType::Data);
                assert_eq!(f.payload, msg.as_bytes());
                pending.push((f.seq, f.payload));
            }
            let (sid, token) = (c.sid, c.token);
            if i == 0 {
                c.suspend();
            } else {
                // Gives the daemon time to journal the acknowledgement.
                std::thread::sleep(ms(20));
                drop(c);
            }
            sessions.push((sid, token, acked_seq, pending));
        }
        std::thread::sleep(ms(100));
        stop_with(srv, sig);
        let srv = start(io, 2, &dir.sock(), &state);
        assert!(
            srv.log()
                .iter()
                .any(|l| l.contains("state dir opened") && l.contains("sessions=8")),
            "the new daemon did not restore 8 sessions:\n{}",
            srv.log_tail(20)
        );
        for (sid, token, acked_seq, pending) in sessions {
            let mut c = srv.client();
            let r = c.resume(sid, acked_seq, &token);
            assert_eq!(r.flags & FLAG_GAP, 0, "[{io}] GAP after restart: {r:?}");
            assert_eq!(
                r.first_replay_seq, pending[0].0,
                "[{io}] replay start {r:?}"
            );
            for (seq, payload) in &pending {
                let f = c.recv();
                assert_eq!(f.ty, FrameType::Data, "[{io}] {f:?}");
                assert_ne!(f.flags & FLAG_REPLAY, 0, "[{io}] not a replay: {f:?}");
                assert_eq!(
                    (f.seq, &f.payload),
                    (*seq, payload),
                    "[{io}] replayed frame"
                );
            }
            // The agent is back: input reaches it and is echoed, numbered after the replay.
            c.send_data(b"after");
            let f = c.recv_within(Duration::from_secs(10));
            assert_eq!(f.ty, FrameType::Data, "[{io}] {f:?}\n{}", srv.log_tail(20));
            assert_eq!(f.payload, b"after");
            assert!(
                f.seq > pending[2].0,
                "[{io}] SEQ reused: {} <= {}",
                f.seq,
                pending[2].0
            );
        }
    }
}

#[test]
fn sigterm_then_restart_resumes_every_session_with_exact_replay() {
    restart_keeps_sessions(libc::SIGTERM);
}

#[test]
fn sigkill_then_restart_resumes_every_session_with_exact_replay() {
    restart_keeps_sessions(libc::SIGKILL);
}

/// Runs a clawtermd on `state` that must refuse to start; returns its stderr.
fn refused(sock: &Path, state: &Path) -> String {
    let mut cmd = harness::clawtermd();
    cmd.args(["--bind", "127.0.0.1", "--port", "0"])
        .args([
            "--insecure-plaintext",
            "--insecure-no-auth",
            "--admin",
            "off",
            "--no-quic",
        ])
        .arg("--socket-dir")
        .arg(sock)
        .arg("--state-dir")
        .arg(state);
    let mut child = cmd.spawn().expect("spawn clawtermd");
    let status = wait_timeout(&mut child, Duration::from_secs(10)).expect("clawtermd exits");
    let mut err = String::new();
    use std::io::Read;
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(
        !status.success(),
        "clawtermd started on a state dir it must refuse: {err}"
    );
    err
}

/// A second daemon on a state dir in use is refused, naming the holder's pid and --upgrade;
/// the first goes on serving its sessions.
#[test]
fn a_state_dir_in_use_is_refused_naming_pid_and_upgrade() {
    let dir = TempDir::with_sock("held");
    let state = dir.0.join("state");
    let _agent = AgentProc::echo(&dir.sock(), TENANT, AGENT);
    let srv = start("epoll", 1, &dir.sock(), &state);
    let mut c = srv.session(AGENT);
    let err = refused(&dir.sock(), &state);
    assert!(err.contains(&format!("pid {}", srv.pid())), "{err}");
    assert!(err.contains("--upgrade"), "{err}");
    c.send_data(b"still here");
    assert_eq!(c.recv().payload, b"still here");
}

/// A state dir of another format, a damaged journal and a truncated one are refused whole,
/// saying what is wrong and what to do; nothing is started on them.
#[test]
fn corrupt_truncated_and_foreign_state_dirs_are_refused() {
    let dir = TempDir::with_sock("corrupt");
    let state = dir.0.join("state");
    let _agent = AgentProc::echo(&dir.sock(), TENANT, AGENT);
    let srv = start("epoll", 1, &dir.sock(), &state);
    let mut c = srv.session(AGENT);
    c.send_data(b"some output to journal");
    assert_eq!(c.recv().ty, FrameType::Data);
    stop_with(srv, libc::SIGKILL);
    let journal = state.join("shard-0.journal");
    let good = std::fs::read(&journal).unwrap();
    // The end of the entries: the first zero length after the header.
    let mut end = 64;
    while u32::from_be_bytes(good[end..end + 4].try_into().unwrap()) != 0 {
        end += 4 + u32::from_be_bytes(good[end..end + 4].try_into().unwrap()) as usize;
    }
    assert!(end > 64, "nothing journaled");

    // Damaged: a byte inside the last entry flipped.
    let mut bad = good.clone();
    bad[end - 6] ^= 0x55;
    std::fs::write(&journal, &bad).unwrap();
    let err = refused(&dir.sock(), &state);
    assert!(
        err.contains("damaged") && err.contains("move the dir away"),
        "{err}"
    );

    // Truncated inside an entry.
    std::fs::write(&journal, &good[..end - 3]).unwrap();
    let err = refused(&dir.sock(), &state);
    assert!(err.contains("truncated"), "{err}");

    // Another journal format version.
    let mut other = good.clone();
    other[4..6].copy_from_slice(&99u16.to_be_bytes());
    std::fs::write(&journal, &other).unwrap();
    let err = refused(&dir.sock(), &state);
    assert!(err.contains("format 99"), "{err}");

    // Another state dir format.
    std::fs::write(&journal, &good).unwrap();
    std::fs::write(state.join("FORMAT"), "clawterm-state 2\n").unwrap();
    let err = refused(&dir.sock(), &state);
    assert!(err.contains("clawterm-state 2"), "{err}");

    // Put back, it starts and the session is there.
    std::fs::write(state.join("FORMAT"), "clawterm-state 1\n").unwrap();
    let srv = start("epoll", 1, &dir.sock(), &state);
    assert!(
        srv.log()
            .iter()
            .any(|l| l.contains("state dir opened") && l.contains("sessions=1")),
        "{}",
        srv.log_tail(10)
    );
}

fn start_upgrade(io: &str, shards: usize, sock: &Path, state: &Path) -> Server {
    Server::start(
        io,
        shards,
        sock,
        &[
            "--state-dir",
            state.to_str().unwrap(),
            "--agent-grace",
            "30",
            "--upgrade",
        ],
    )
}

/// Waits (bounded) for a server process to exit by itself; its exit status must be success.
fn wait_exit(mut srv: Server, what: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while srv.alive() {
        assert!(
            std::time::Instant::now() < deadline,
            "{what} still running 10 s after the upgrade:\n{}",
            srv.log_tail(30)
        );
        std::thread::sleep(ms(10));
    }
}

/// A live upgrade, three times in a row: attached plaintext clients keep their connections
/// (no reconnect, no RESUME) and their sessions go on with the SEQ numbering they had;
/// suspended sessions resume at the new process with exact replay; the old process exits;
/// the port keeps accepting.
#[test]
fn live_upgrade_keeps_plaintext_connections_and_sessions() {
    for io in ["epoll", "uring"] {
        let dir = TempDir::with_sock("upgrade");
        let state = dir.0.join("state");
        let _agent = AgentProc::echo(&dir.sock(), TENANT, AGENT);
        let mut srv = start(io, 2, &dir.sock(), &state);
        let addr = srv.addr;
        let mut attached: Vec<(Client, u32)> = Vec::new();
        for i in 0..16u32 {
            let mut c = srv.session(AGENT);
            c.send_data(format!("hello-{i}").as_bytes());
            let f = c.recv();
            assert_eq!(f.payload, format!("hello-{i}").as_bytes());
            c.ack(f.seq);
            attached.push((c, f.seq));
        }
        let mut suspended = Vec::new();
        for i in 0..3u32 {
            let mut c = srv.session(AGENT);
            c.send_data(format!("kept-{i}").as_bytes());
            let f = c.recv();
            let (sid, token) = (c.sid, c.token);
            c.suspend();
            suspended.push((sid, token, f.seq, f.payload));
        }
        for round in 0..3 {
            let next = start_upgrade(io, 2, &dir.sock(), &state);
            assert_eq!(
                next.addr, addr,
                "[{io}] the new process listens on the same socket"
            );
            assert_eq!(
                next.ws, srv.ws,
                "[{io}] the WebSocket port is handed over too"
            );
            assert!(next.ws.is_some());
            assert!(
                next.log().iter().any(|l| l.contains("upgrade: took over")),
                "[{io}] {}",
                next.log_tail(20)
            );
            wait_exit(srv, "the old clawtermd");
            srv = next;
            for (i, (c, last)) in attached.iter_mut().enumerate() {
                let msg = format!("round-{round}-{i}");
                c.send_data(msg.as_bytes());
                let f = c.recv_within(Duration::from_secs(10));
                assert_eq!(
                    f.ty,
                    FrameType::Data,
                    "[{io}] round {round} session {i}: {f:?}"
                );
                assert_eq!(f.payload, msg.as_bytes(), "[{io}] round {round}");
                assert!(
                    f.seq > *last,
                    "[{io}] SEQ went back: {} after {}",
                    f.seq,
                    last
                );
                *last = f.seq;
                c.ack(f.seq);
            }
        }
        for (sid, token, seq, payload) in suspended {
            let mut c = srv.client();
            let r = c.resume(sid, seq - 1, &token);
            assert_eq!(r.flags & FLAG_GAP, 0);
            let f = c.recv();
            assert_ne!(f.flags & FLAG_REPLAY, 0, "[{io}] {f:?}");
            assert_eq!(
                (f.seq, f.payload),
                (seq, payload),
                "[{io}] replay after upgrades"
            );
            c.send_data(b"more");
            assert_eq!(c.recv_within(Duration::from_secs(10)).payload, b"more");
        }
        // New sessions on the same port.
        let mut c = srv.session(AGENT);
        c.send_data(b"new");
        assert_eq!(c.recv().payload, b"new");
        // The WebSocket port, inherited three times, serves the page.
        let ws = srv.ws.expect("WebSocket port");
        let mut s = std::net::TcpStream::connect(ws).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        std::io::Write::write_all(&mut s, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut page = String::new();
        let _ = std::io::Read::read_to_string(&mut s, &mut page);
        assert!(page.starts_with("HTTP/1.1 200 OK"), "[{io}] {page}");
    }
}

/// An `--upgrade` speaking another hand-off format is refused before anything moves: it exits
/// with an error naming both versions, and the running clawtermd serves on, its sessions and
/// connections untouched.
#[test]
fn an_upgrade_of_another_hand_off_version_is_refused_and_the_old_serves_on() {
    let dir = TempDir::with_sock("upgrade-version");
    let state = dir.0.join("state");
    let _agent = AgentProc::echo(&dir.sock(), TENANT, AGENT);
    let srv = start("epoll", 1, &dir.sock(), &state);
    let mut c = srv.session(AGENT);
    let mut cmd = harness::clawtermd();
    cmd.args(["--bind", "127.0.0.1", "--port", "0"])
        .args([
            "--insecure-plaintext",
            "--insecure-no-auth",
            "--admin",
            "off",
            "--no-quic",
        ])
        .arg("--socket-dir")
        .arg(dir.sock())
        .arg("--state-dir")
        .arg(&state)
        .arg("--upgrade")
        .env("CLAWTERMD_TEST_UPGRADE_VERSION", "99");
    let mut child = cmd.spawn().unwrap();
    let status = wait_timeout(&mut child, Duration::from_secs(10)).expect("exits");
    let mut err = String::new();
    use std::io::Read;
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(!status.success(), "{err}");
    assert!(
        err.contains("refused the upgrade") && err.contains("format 99"),
        "{err}"
    );
    assert!(err.contains("keeps serving"), "{err}");
    c.send_data(b"still served");
    assert_eq!(c.recv().payload, b"still served");
    let mut c2 = srv.session(AGENT);
    c2.send_data(b"and new ones");
    assert_eq!(c2.recv().payload, b"and new ones");
}

/// A TLS `clawtermd` on `state` (2 shards, epoll), with `extra` arguments.
fn tls_server(
    dir: &TempDir,
    state: &Path,
    cert: &Path,
    key: &Path,
    tokens: &Path,
    extra: &[&str],
) -> (
    harness::Proc,
    harness::Lines,
    std::net::SocketAddr,
    Option<std::net::SocketAddr>,
) {
    let mut cmd = harness::clawtermd();
    cmd.args([
        "--bind",
        "127.0.0.1",
        "--port",
        "0",
        "--shards",
        "2",
        "--io",
        "epoll",
    ])
    .args(["--admin", "off"])
    .arg("--tls-cert")
    .arg(cert)
    .arg("--tls-key")
    .arg(key)
    .arg("--tokens")
    .arg(tokens)
    .arg("--socket-dir")
    .arg(dir.sock())
    .arg("--state-dir")
    .arg(state)
    .args(extra)
    .env("RUST_LOG", "info");
    let (child, lines, line) = harness::start_server(&mut cmd, "clawtermd");
    let quic = line
        .contains(" and quic ")
        .then(|| harness::quic_addr(&line).unwrap());
    (
        harness::Proc(child),
        lines,
        harness::tcp_addr(&line).unwrap(),
        quic,
    )
}

/// A TLS or QUIC connection cannot move to the new process: the old one closes it once its
/// session has moved, and the client library reconnects at once (no backoff wait: the first
/// retry is immediate after a clean close of a healthy connection) and RESUMEs there — once —
/// with nothing lost or repeated.
#[test]
fn tls_clients_reconnect_once_and_at_once_across_a_live_upgrade() {
    secure_clients_across_upgrade(false);
}

#[test]
fn quic_clients_reconnect_once_and_at_once_across_a_live_upgrade() {
    secure_clients_across_upgrade(true);
}

fn secure_clients_across_upgrade(quic: bool) {
    use clawterm_client::{Event, Options, Session, TlsTrust, Transport};
    let dir = TempDir::with_sock("upgrade-tls");
    let state = dir.0.join("state");
    let certdir = dir.0.join("cert");
    std::fs::create_dir_all(&certdir).unwrap();
    let (cert, key, fingerprint) = clawterm::server::tls::self_signed(&certdir).unwrap();
    let token = [0xAB; 32];
    let tokens = dir.0.join("tokens");
    std::fs::write(&tokens, format!("{TENANT} {}\n", harness::hex(&token))).unwrap();
    let _agent = AgentProc::echo(&dir.sock(), TENANT, AGENT);
    let q: &[&str] = if quic {
        &["--quic-port", "0"]
    } else {
        &["--no-quic"]
    };
    let (mut old, _old_log, addr, qaddr) = tls_server(&dir, &state, &cert, &key, &tokens, q);
    let pin = clawterm_client::transport::parse_pin(&fingerprint).unwrap();
    let trust = TlsTrust {
        pin: Some(pin),
        ..TlsTrust::default()
    };
    let (endpoint, transport) = if quic {
        (qaddr.expect("QUIC address"), Transport::Quic(trust))
    } else {
        (addr, Transport::Tls(trust))
    };
    let opts = Options {
        transport,
        ..Options::default()
    };
    let mut s = Session::connect_with(&endpoint.to_string(), TENANT, AGENT, token, opts).unwrap();
    s.send(b"before;").unwrap();
    let recv_until = |s: &mut Session, want: &[u8], evs: &mut Vec<Event>| {
        let mut data = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !data.ends_with(want) {
            assert!(
                std::time::Instant::now() < deadline,
                "got {data:?}, events {evs:?}"
            );
            match s.recv(Duration::from_millis(100)).unwrap() {
                Some(Event::Data(d)) => data.extend_from_slice(&d),
                Some(e) => evs.push(e),
                None => {}
            }
        }
        data
    };
    let mut evs = Vec::new();
    assert_eq!(recv_until(&mut s, b"before;", &mut evs), b"before;");
    std::thread::sleep(Duration::from_millis(1100)); // a healthy connection
    let mut args = q.to_vec();
    args.push("--upgrade");
    let (_new, new_log, new_addr, new_q) = tls_server(&dir, &state, &cert, &key, &tokens, &args);
    assert_eq!((new_addr, new_q), (addr, qaddr), "the same sockets");
    let exited = wait_timeout(&mut old.0, Duration::from_secs(10)).expect("the old one exits");
    assert!(exited.success());
    s.send(b"after;").unwrap();
    let data = recv_until(&mut s, b"after;", &mut evs);
    assert_eq!(data, b"after;", "nothing lost, nothing repeated");
    let downs: Vec<&Event> = evs
        .iter()
        .filter(|e| matches!(e, Event::Disconnected { .. }))
        .collect();
    assert_eq!(downs.len(), 1, "reconnected once: {evs:?}");
    assert!(
        matches!(downs[0], Event::Disconnected { retry_in, .. } if retry_in.is_zero()),
        "the reconnect was not immediate: {evs:?}"
    );
    assert_eq!(
        evs.iter()
            .filter(|e| matches!(e, Event::Reconnected { .. }))
            .count(),
        1,
        "{evs:?}"
    );
    assert!(
        new_log
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("upgrade: took over")),
        "no hand-over in the new log"
    );
}

/// Reads frames (acknowledging each) until `want` appears in what arrived; returns the bytes
/// and the last SEQ.
fn read_until(c: &mut Client, want: &[u8], data: &mut Vec<u8>) -> u32 {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut last = 0;
    while !harness::contains(data, want) {
        assert!(
            std::time::Instant::now() < deadline,
            "no {:?} after 60 s; got {} bytes ending {:?}",
            String::from_utf8_lossy(want),
            data.len(),
            String::from_utf8_lossy(&data[data.len().saturating_sub(200)..])
        );
        let f = c.recv_within(Duration::from_secs(30));
        if f.ty == FrameType::Data {
            data.extend_from_slice(&f.payload);
            c.ack(f.seq);
            last = f.seq;
        }
    }
    last
}

/// The shell's pid, from `echo PID-$$` (computed by the shell, so the terminal's echo of the
/// typed line never matches).
fn shell_pid(c: &mut Client) -> (u32, u32) {
    c.send_data(b"echo PID-$$-E$((1+1))D\r");
    let mut data = Vec::new();
    let last = read_until(c, b"-E2D\r\n", &mut data);
    let text = String::from_utf8_lossy(&data);
    let at = text.rfind("PID-").expect("PID- in the output") + 4;
    let pid: u32 = text[at..]
        .split('-')
        .next()
        .unwrap()
        .parse()
        .expect("a pid");
    (pid, last)
}

/// `claw-agent shell` sessions across a daemon restart (SIGTERM) or crash (SIGKILL): the shell
/// keeps running (same pid), the output it produces while no daemon is there waits in the
/// agent, and after the new daemon restored the session and REOPENed it, the client's RESUME
/// gets all of it exactly once, in order.
fn shell_survives(sig: libc::c_int) {
    for io in ["epoll", "uring"] {
        let dir = TempDir::with_sock("restart-shell");
        let state = dir.0.join("state");
        let _agent = AgentProc::start(&dir.sock(), TENANT, AGENT, &["shell", "--shell", "/bin/sh"]);
        let srv = start(io, 2, &dir.sock(), &state);
        let mut c = srv.session(AGENT);
        let (sid, token) = (c.sid, c.token);
        let (pid, _) = shell_pid(&mut c);
        c.send_data(b"sleep 1; echo START-$((1+1)); seq 1 30000; echo DONE-$((40+2))\r");
        // The terminal's echo of the line, then nothing until the sleep ends.
        let mut data = Vec::new();
        let acked = read_until(&mut c, b"DONE-$((40+2))\r\n", &mut data);
        stop_with(srv, sig);
        drop(c);
        std::thread::sleep(Duration::from_millis(1500)); // the shell prints with no daemon
        let srv = start(io, 2, &dir.sock(), &state);
        let mut c = srv.client();
        let r = c.resume(sid, acked, &token);
        assert_eq!(r.flags & FLAG_GAP, 0, "[{io}] {r:?}");
        let mut out = Vec::new();
        read_until(&mut c, b"DONE-42\r\n", &mut out);
        let text = String::from_utf8_lossy(&out);
        let start = text.find("START-2\r\n").expect("START-2") + 9;
        let end = start + text[start..].find("DONE-42\r\n").expect("DONE-42");
        let lines: Vec<&str> = text[start..end].split_terminator("\r\n").collect();
        assert_eq!(lines.len(), 30_000, "[{io}] line count");
        for (i, l) in lines.iter().enumerate() {
            assert_eq!(*l, (i + 1).to_string(), "[{io}] line {}", i + 1);
        }
        assert_eq!(shell_pid(&mut c).0, pid, "[{io}] the same shell");
    }
}

#[test]
fn shell_sessions_survive_sigterm_and_restart_with_their_output() {
    shell_survives(libc::SIGTERM);
}

#[test]
fn shell_sessions_survive_sigkill_and_restart_with_their_output() {
    shell_survives(libc::SIGKILL);
}

/// Two daemons started at the same moment on one empty state dir: exactly one serves, the
/// other is refused naming the winner's pid — never two daemons serving one session.
#[test]
fn two_daemons_racing_for_one_state_dir_one_wins() {
    let dir = TempDir::with_sock("race");
    let state = dir.0.join("state");
    for round in 0..5 {
        let spawn = || {
            let mut cmd = harness::clawtermd();
            cmd.args(["--bind", "127.0.0.1", "--port", "0"])
                .args([
                    "--insecure-plaintext",
                    "--insecure-no-auth",
                    "--admin",
                    "off",
                    "--no-quic",
                ])
                .arg("--socket-dir")
                .arg(dir.sock())
                .arg("--state-dir")
                .arg(&state)
                .env("RUST_LOG", "info");
            cmd.spawn().expect("spawn clawtermd")
        };
        let mut a = harness::Proc(spawn());
        let mut b = harness::Proc(spawn());
        std::thread::sleep(Duration::from_millis(700));
        let ea = a.0.try_wait().unwrap();
        let eb = b.0.try_wait().unwrap();
        let (winner, loser) = match (ea, eb) {
            (None, Some(s)) => (&mut a, (&mut b, s)),
            (Some(s), None) => (&mut b, (&mut a, s)),
            other => panic!("round {round}: exactly one must serve: {other:?}"),
        };
        assert!(!loser.1.success());
        let mut err = String::new();
        use std::io::Read;
        loser
            .0
             .0
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        assert!(
            err.contains(&format!("pid {}", winner.0.id())) && err.contains("--upgrade"),
            "round {round}: {err}"
        );
        signal(winner.0.id(), libc::SIGTERM);
        wait_timeout(&mut winner.0, Duration::from_secs(10)).expect("the winner stops");
    }
}

/// GET /metrics from an admin endpoint (blocking, bounded).
fn metrics(addr: std::net::SocketAddr) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

/// The admin endpoint's port moves to the new process too (it binds once the old one has
/// released it), and its metrics tell the hand-off: what moved, how long it took; the old
/// process counted a completed upgrade.
#[test]
fn the_admin_port_and_the_hand_off_metrics_move_with_an_upgrade() {
    let dir = TempDir::with_sock("upgrade-admin");
    let state = dir.0.join("state");
    let _agent = AgentProc::echo(&dir.sock(), TENANT, AGENT);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let admin = format!("127.0.0.1:{port}");
    let spawn = |upgrade: bool| {
        let mut cmd = harness::clawtermd();
        cmd.args(["--bind", "127.0.0.1", "--port", "0", "--shards", "2"])
            .args(["--insecure-plaintext", "--insecure-no-auth", "--no-quic"])
            .args(["--admin", &admin])
            .arg("--socket-dir")
            .arg(dir.sock())
            .arg("--state-dir")
            .arg(&state)
            .env("RUST_LOG", "info");
        if upgrade {
            cmd.arg("--upgrade");
        }
        harness::start_server(&mut cmd, "clawtermd")
    };
    let (old, old_log, line) = spawn(false);
    let mut old = harness::Proc(old);
    let addr = harness::tcp_addr(&line).unwrap();
    let mut c = Client::connect(addr);
    c.try_connect(TENANT, AGENT).unwrap();
    c.send_data(b"x");
    assert_eq!(c.recv().payload, b"x");
    let admin_addr: std::net::SocketAddr = admin.parse().unwrap();
    assert!(metrics(admin_addr).contains("clawterm_upgrades_total{result=\"completed\"} 0"));
    let (new, _new_log, _) = spawn(true);
    let _new = harness::Proc(new);
    wait_timeout(&mut old.0, Duration::from_secs(10)).expect("the old one exits");
    assert!(
        old_log
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("upgrade: handed over; exiting") && l.contains("sessions=1")),
        "{:?}",
        old_log.lock().unwrap()
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let m = loop {
        let m = metrics(admin_addr);
        if m.contains("clawterm_upgrade_last_moved{what=\"sessions\"} 1") {
            break m;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the new process's metrics never showed the hand-off:\n{m}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        m.contains("clawterm_upgrade_last_moved{what=\"connections\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("clawterm_upgrade_last_moved{what=\"links\"} 1"),
        "{m}"
    );
    assert!(m.contains("clawterm_upgrade_last_seconds"), "{m}");
    c.send_data(b"y");
    assert_eq!(c.recv().payload, b"y");
}

/// Input a client sent while its pod was away is held by the daemon (and acknowledged); a
/// restart (SIGTERM) in that window does not lose it: the next daemon sends it to the pod after
/// the REOPEN, exactly once, and the client's RESUME gets the pod's answers.
#[test]
fn input_held_for_an_absent_pod_survives_a_restart() {
    let dir = TempDir::with_sock("held");
    let state = dir.0.join("state");
    let agent = AgentProc::echo(&dir.sock(), TENANT, AGENT);
    let srv = start("epoll", 1, &dir.sock(), &state);
    let mut c = srv.session(AGENT);
    let (sid, token) = (c.sid, c.token);
    c.send_data(b"before;");
    let f = c.recv();
    assert_eq!(f.payload, b"before;");
    c.ack(f.seq);
    let acked = f.seq;
    agent.terminate();
    std::thread::sleep(ms(200)); // the daemon sees the pod go
    c.send_data(b"held-1;");
    c.send_data(b"held-2;");
    std::thread::sleep(ms(200)); // received and held
    stop_with(srv, libc::SIGTERM);
    drop(c);
    let srv = start("epoll", 1, &dir.sock(), &state);
    let _agent = AgentProc::echo(&dir.sock(), TENANT, AGENT);
    let mut c = srv.client();
    c.resume(sid, acked, &token);
    let mut got = Vec::new();
    while got.len() < b"held-1;held-2;".len() {
        let f = c.recv_within(Duration::from_secs(10));
        assert_eq!(f.ty, FrameType::Data, "{f:?}\n{}", srv.log_tail(20));
        got.extend_from_slice(&f.payload);
        c.ack(f.seq);
    }
    assert_eq!(
        got, b"held-1;held-2;",
        "the held input reached the pod once, in order"
    );
    c.send_data(b"after;");
    assert_eq!(c.recv_within(Duration::from_secs(10)).payload, b"after;");
}

/// A session whose agent ended it while its client was away keeps its output for the client
/// across a restart: the RESUME gets the replay, then DISCONNECT; the pod is not asked to take
/// the session back (no REOPEN: the exec agent starts no second process).
#[test]
fn a_session_its_agent_closed_keeps_its_output_across_a_restart() {
    let dir = TempDir::with_sock("closed");
    let state = dir.0.join("state");
    let starts = dir.0.join("starts");
    let script = format!(
        "echo started >> {}; read line; echo bye-$line",
        starts.display()
    );
    let _agent = AgentProc::exec_sh(&dir.sock(), TENANT, AGENT, &script);
    let srv = start("epoll", 1, &dir.sock(), &state);
    let mut c = srv.session(AGENT);
    let (sid, token) = (c.sid, c.token);
    c.send_data(b"now\n");
    c.suspend(); // the output and the agent's CLOSE come while suspended
    std::thread::sleep(ms(500));
    stop_with(srv, libc::SIGTERM);
    let srv = start("epoll", 1, &dir.sock(), &state);
    std::thread::sleep(ms(300)); // a REOPEN, if one were sent, would start the script again
    let mut c = srv.client();
    c.resume(sid, 1, &token);
    let mut got = Vec::new();
    loop {
        let f = c.recv_within(Duration::from_secs(10));
        match f.ty {
            FrameType::Data => got.extend_from_slice(&f.payload),
            FrameType::Disconnect => break,
            FrameType::Error => {} // AGENT_GONE may precede DISCONNECT
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(got, b"bye-now\n");
    let n = std::fs::read_to_string(&starts).unwrap().lines().count();
    assert_eq!(n, 1, "the agent was asked to take the closed session back");
}

/// Connections that open and close while the daemon hands itself over (one closing in the very
/// turn its shard freezes cannot be moved) never hold a live upgrade up; none is refused. New
/// sessions opened meanwhile all get their ACCEPT and echo (a connection the old process had
/// accepted as its listener went over moves too, never reset).
#[test]
fn upgrades_complete_while_connections_come_and_go() {
    for io in ["uring", "epoll"] {
        let dir = TempDir::with_sock("upgrade-churn");
        let state = dir.0.join("state");
        let _agent = AgentProc::echo(&dir.sock(), TENANT, AGENT);
        let mut srv = start(io, 2, &dir.sock(), &state);
        let addr = srv.addr;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s2 = stop.clone();
        let churn = std::thread::spawn(move || {
            let (mut n, mut refused) = (0u32, 0u32);
            while !s2.load(std::sync::atomic::Ordering::Relaxed) {
                match std::net::TcpStream::connect(addr) {
                    Ok(s) => drop(s),
                    Err(_) => refused += 1,
                }
                n += 1;
                std::thread::sleep(Duration::from_micros(500));
            }
            (n, refused)
        });
        let s3 = stop.clone();
        let fresh = std::thread::spawn(move || {
            let mut n = 0u32;
            while !s3.load(std::sync::atomic::Ordering::Relaxed) {
                let mut c = Client::connect(addr);
                if let Err(e) = c.try_connect(TENANT, AGENT) {
                    panic!("new session {n} refused with ERROR {e}");
                }
                c.send_data(format!("n{n}").as_bytes());
                assert_eq!(
                    c.recv_within(Duration::from_secs(10)).payload,
                    format!("n{n}").as_bytes(),
                    "new session {n}'s echo"
                );
                n += 1;
            }
            n
        });
        // Sessions resumed over and over on new connections: with two shards half the RESUMEs
        // land on the other shard's listener and are handed across, also while the shards
        // move one at a time.
        let s4 = stop.clone();
        let mut kept: Vec<Client> = (0..8).map(|_| srv.session(AGENT)).collect();
        let resumer = std::thread::spawn(move || {
            let mut n = 0u32;
            while !s4.load(std::sync::atomic::Ordering::Relaxed) {
                let k = n as usize % kept.len();
                let (sid, last, token, tx) =
                    (kept[k].sid, kept[k].last_seq, kept[k].token, kept[k].tx_seq);
                let mut c = Client::connect(addr);
                let r = c.resume(sid, last, &token);
                c.tx_seq = tx.max(r.last_client_seq);
                c.last_seq = last;
                c.send_data(format!("m{n}").as_bytes());
                assert_eq!(
                    c.recv_within(Duration::from_secs(10)).payload,
                    format!("m{n}").as_bytes(),
                    "resume {n}'s echo"
                );
                kept[k] = c;
                n += 1;
            }
            n
        });
        let mut c = srv.session(AGENT);
        for k in 0..5 {
            let t0 = std::time::Instant::now();
            let next = start_upgrade(io, 2, &dir.sock(), &state);
            wait_exit(srv, "the old clawtermd");
            assert!(
                t0.elapsed() < Duration::from_secs(5),
                "[{io}] upgrade {k} took {:?}",
                t0.elapsed()
            );
            srv = next;
            c.send_data(format!("r{k}").as_bytes());
            assert_eq!(
                c.recv_within(Duration::from_secs(10)).payload,
                format!("r{k}").as_bytes()
            );
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let (n, refused) = churn.join().unwrap();
        let sessions = fresh
            .join()
            .unwrap_or_else(|_| panic!("[{io}] a new session failed during the upgrades"));
        assert!(sessions > 20, "[{io}] only {sessions} new sessions made");
        let resumes = resumer
            .join()
            .unwrap_or_else(|_| panic!("[{io}] a RESUME failed during the upgrades"));
        assert!(resumes > 20, "[{io}] only {resumes} resumes made");
        assert!(n > 100, "[{io}] only {n} connections made");
        assert_eq!(refused, 0, "[{io}] {refused} of {n} connections refused");
    }
}
