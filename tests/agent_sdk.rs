//! The agent SDK and the `claw-agent` binary, over real processes and Unix sockets: a fake
//! daemon speaks the pod link (POD-LINK.md §2, §3, §6) with `clawterm::podlink`.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use clawterm_testkit as harness;

use harness::{dead, first_line, remember, temp_path, wait_dead};

use clawterm::podlink::{decode, encode, Decoded, Msg, Open, MAX_BODY};
use clawterm_agent::{Agent, AgentListener, CloseReason, OpenInfo, Outbox, SessionId};

const TIMEOUT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// Helpers

fn temp_dir(name: &str) -> PathBuf {
    temp_path(&format!("agent-sdk-{name}"))
}

/// An owned pod-link message, as received by the fake daemon.
#[derive(Debug, PartialEq, Eq)]
enum Got {
    Hello(u8, String),
    Data(Vec<u8>),
    Close(CloseReason),
    Other(u8),
}

/// The fake daemon's side of one link.
struct Link {
    stream: UnixStream,
    buf: Vec<u8>,
}

impl Link {
    /// Connects and does the HELLO exchange.
    fn connect(path: &Path) -> Link {
        let mut l = Link::connect_raw(path);
        l.send(
            0,
            &Msg::Hello {
                version: 1,
                name: "fake-clawtermd",
            },
        );
        match l.recv() {
            // 2: the agent can move sessions (echo), 1: it cannot (exec, shell).
            Some((0, Got::Hello(1 | 2, name))) => assert_eq!(name, "claw-agent"),
            other => panic!("expected HELLO, got {other:?}"),
        }
        l
    }

    fn connect_raw(path: &Path) -> Link {
        let stream = UnixStream::connect(path).expect("connect to the agent");
        stream.set_read_timeout(Some(TIMEOUT)).unwrap();
        Link {
            stream,
            buf: Vec::new(),
        }
    }

    fn send(&mut self, sid: u32, msg: &Msg<'_>) {
        let mut v = Vec::new();
        encode(&mut v, sid, msg);
        self.stream.write_all(&v).expect("write to the agent");
    }

    fn open(&mut self, sid: u32) {
        self.send(sid, &Msg::Open(open_body()));
    }

    /// Next message, or `None` on EOF. Panics on timeout.
    fn recv(&mut self) -> Option<(u32, Got)> {
        recv_from(&mut self.stream, &mut self.buf)
    }

    /// Receives DATA for `sid` until `want` bytes have come (exec output may be split).
    fn recv_data_bytes(&mut self, sid: u32, want: usize) -> Vec<u8> {
        let mut got = Vec::new();
        while got.len() < want {
            match self.recv() {
                Some((s, Got::Data(d))) if s == sid => got.extend_from_slice(&d),
                other => panic!("expected DATA for {sid}, got {other:?}"),
            }
        }
        got
    }

    /// Asserts the agent closes the link (EOF) within the timeout.
    fn expect_eof(&mut self) {
        loop {
            match self.recv() {
                None => return,
                Some((0, Got::Hello(..))) => {}
                Some(m) => panic!("expected the link to close, got {m:?}"),
            }
        }
    }
}

fn open_body() -> Open<'static> {
    Open {
        tenant: 1,
        agent: 7,
        client_caps: 3,
        peer: "127.0.0.1:50000",
    }
}

fn recv_from(stream: &mut UnixStream, buf: &mut Vec<u8>) -> Option<(u32, Got)> {
    loop {
        match decode(buf).expect("agent sent a malformed message") {
            Decoded::Msg {
                session_id,
                msg,
                used,
            } => {
                let got = match msg {
                    Msg::Hello { version, name } => Got::Hello(version, name.to_owned()),
                    Msg::Data(d) => Got::Data(d.to_vec()),
                    Msg::Close(r) => Got::Close(r),
                    m => Got::Other(m.ty().code()),
                };
                buf.drain(..used);
                return Some((session_id, got));
            }
            Decoded::NeedMore(_) => {
                let mut chunk = [0u8; 65536];
                match stream.read(&mut chunk) {
                    Ok(0) => {
                        assert!(buf.is_empty(), "EOF inside a message");
                        return None;
                    }
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return None,
                    Err(e) => panic!("read from the agent: {e}"),
                }
            }
        }
    }
}

/// A running `claw-agent`, killed and cleaned up on drop.
struct AgentProc {
    child: Child,
    dir: PathBuf,
    path: PathBuf,
}

impl AgentProc {
    fn start(dir: &Path, mode: &[&str]) -> AgentProc {
        AgentProc::start_with(dir, &[], mode)
    }

    /// With `opts` before the mode (e.g. `--daemon-grace 0`).
    fn start_with(dir: &Path, opts: &[&str], mode: &[&str]) -> AgentProc {
        let args: Vec<&str> = opts.iter().chain(mode).copied().collect();
        let mut child = agent_cmd(dir, &args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start claw-agent");
        let line = first_line(&mut child, TIMEOUT);
        let path = dir.join("1_7");
        assert_eq!(
            line.trim_end(),
            format!(
                "claw-agent listening on {} (mode {})",
                path.display(),
                mode[0]
            )
        );
        AgentProc {
            child,
            dir: dir.to_owned(),
            path,
        }
    }

    fn signal(&self, sig: i32) {
        // SAFETY: plain kill(2) of our own child.
        assert_eq!(unsafe { libc::kill(self.child.id() as i32, sig) }, 0);
    }

    fn wait(&mut self) -> ExitStatus {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(Instant::now() < deadline, "claw-agent did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn agent_cmd(dir: &Path, mode: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_claw-agent"));
    c.arg("-s")
        .arg(dir)
        .args(["--tenant", "1", "--agent", "7"])
        .args(mode)
        .env("RUST_LOG", "warn");
    c
}

// ---------------------------------------------------------------------------------------------
// claw-agent echo

#[test]
fn echo_two_sessions() {
    let a = AgentProc::start(&temp_dir("two"), &["echo"]);
    let mut l = Link::connect(&a.path);
    l.open(1);
    l.open(2);
    l.send(1, &Msg::Data(b"hello one"));
    l.send(2, &Msg::Data(b"hello two"));
    l.send(1, &Msg::Data(b""));
    l.send(2, &Msg::Resize { cols: 80, rows: 24 }); // no reply expected
    l.send(2, &Msg::Data(&[0u8, 255, 10, 13]));
    assert_eq!(l.recv(), Some((1, Got::Data(b"hello one".to_vec()))));
    assert_eq!(l.recv(), Some((2, Got::Data(b"hello two".to_vec()))));
    assert_eq!(l.recv(), Some((1, Got::Data(Vec::new()))));
    assert_eq!(l.recv(), Some((2, Got::Data(vec![0, 255, 10, 13]))));
    // A maximal body comes back as one message.
    let big: Vec<u8> = (0..MAX_BODY).map(|i| (i % 251) as u8).collect();
    l.send(1, &Msg::Data(&big));
    assert_eq!(l.recv(), Some((1, Got::Data(big))));
}

/// `sessions` sessions × `per` messages, interleaved, written by one thread while another reads;
/// every session must get back exactly its own messages, in order, one DATA per DATA.
fn blast(path: &Path, first_sid: u32, sessions: u32, per: u32) {
    let mut l = Link::connect(path);
    let mut w = l.stream.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let mut v = Vec::new();
        for s in 0..sessions {
            encode(&mut v, first_sid + s, &Msg::Open(open_body()));
        }
        w.write_all(&v).unwrap();
        for i in 0..per {
            v.clear();
            for s in 0..sessions {
                let sid = first_sid + s;
                let body = payload(sid, i);
                encode(&mut v, sid, &Msg::Data(&body));
            }
            w.write_all(&v).unwrap();
        }
    });
    let mut next: HashMap<u32, u32> = HashMap::new();
    for _ in 0..sessions * per {
        match l.recv() {
            Some((sid, Got::Data(d))) => {
                assert!(
                    (first_sid..first_sid + sessions).contains(&sid),
                    "sid {sid}"
                );
                let i = next.entry(sid).or_insert(0);
                assert_eq!(d, payload(sid, *i), "session {sid} message {i}");
                *i += 1;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    writer.join().unwrap();
    assert!(next.values().all(|&n| n == per));
    assert_eq!(next.len(), sessions as usize);
}

fn payload(sid: u32, i: u32) -> Vec<u8> {
    let mut p = format!("s{sid}m{i}:").into_bytes();
    p.resize(
        p.len() + ((sid * 7 + i * 13) % 300) as usize,
        b'a' + (i % 26) as u8,
    );
    p
}

#[test]
fn many_sessions_on_two_concurrent_links() {
    let a = AgentProc::start(&temp_dir("many"), &["echo"]);
    let p1 = a.path.clone();
    let p2 = a.path.clone();
    let t1 = std::thread::spawn(move || blast(&p1, 1, 200, 50));
    let t2 = std::thread::spawn(move || blast(&p2, 1, 200, 50)); // same ids, other link
    t1.join().unwrap();
    t2.join().unwrap();
}

#[test]
fn close_stops_replies_for_that_session() {
    let a = AgentProc::start(&temp_dir("close"), &["echo"]);
    let mut l = Link::connect(&a.path);
    l.open(1);
    l.open(2);
    l.send(1, &Msg::Data(b"before"));
    assert_eq!(l.recv(), Some((1, Got::Data(b"before".to_vec()))));
    l.send(1, &Msg::Close(CloseReason::ClientDisconnect));
    l.send(1, &Msg::Data(b"after close"));
    l.send(2, &Msg::Data(b"still here"));
    // Replies are in order on the link: one for session 1 would come first.
    assert_eq!(l.recv(), Some((2, Got::Data(b"still here".to_vec()))));
    // A session never opened gets nothing either.
    l.send(99, &Msg::Data(b"who?"));
    l.send(2, &Msg::Data(b"again"));
    assert_eq!(l.recv(), Some((2, Got::Data(b"again".to_vec()))));
}

#[test]
fn non_hello_first_message_closes_the_link() {
    let a = AgentProc::start(&temp_dir("nohello"), &["echo"]);
    let mut bad = Link::connect_raw(&a.path);
    bad.open(1);
    bad.send(1, &Msg::Data(b"x"));
    bad.expect_eof();
    // Other links are unaffected.
    let mut good = Link::connect(&a.path);
    good.open(1);
    good.send(1, &Msg::Data(b"ok"));
    assert_eq!(good.recv(), Some((1, Got::Data(b"ok".to_vec()))));
}

#[test]
fn malformed_input_closes_the_link_not_the_agent() {
    let a = AgentProc::start(&temp_dir("malformed"), &["echo"]);
    // LEN below 5.
    let mut l = Link::connect(&a.path);
    l.stream.write_all(&[0, 0, 0, 2, 0x10, 0]).unwrap();
    l.expect_eof();
    // LEN over 1 MiB + 5.
    let mut l = Link::connect(&a.path);
    l.stream
        .write_all(&[0, 0x20, 0, 0, 0x10, 0, 0, 0, 1])
        .unwrap();
    l.expect_eof();
    // A RESIZE body of the wrong size.
    let mut l = Link::connect(&a.path);
    l.open(1);
    l.stream
        .write_all(&[0, 0, 0, 6, 0x11, 0, 0, 0, 1, 9])
        .unwrap();
    l.expect_eof();
    // A HELLO of another version.
    let mut l = Link::connect_raw(&a.path);
    l.send(
        0,
        &Msg::Hello {
            version: 9,
            name: "",
        },
    );
    l.expect_eof();
    // Still serving.
    let mut l = Link::connect(&a.path);
    l.open(5);
    l.send(5, &Msg::Data(b"alive"));
    assert_eq!(l.recv(), Some((5, Got::Data(b"alive".to_vec()))));
}

#[test]
fn stale_socket_file_is_replaced() {
    let dir = temp_dir("stale");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("1_7");
    drop(UnixListener::bind(&path).unwrap()); // leaves the file, nobody listening
    assert!(path.exists());
    assert!(UnixStream::connect(&path).is_err());
    let a = AgentProc::start(&dir, &["echo"]);
    let mut l = Link::connect(&a.path);
    l.open(1);
    l.send(1, &Msg::Data(b"fresh"));
    assert_eq!(l.recv(), Some((1, Got::Data(b"fresh".to_vec()))));
}

#[test]
fn second_agent_on_the_same_path_refuses_to_start() {
    let dir = temp_dir("second");
    let a = AgentProc::start(&dir, &["echo"]);
    let out = agent_cmd(&dir, &["echo"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("another agent is already listening on") && stderr.contains("1_7"),
        "stderr: {stderr}"
    );
    assert!(
        out.stdout.is_empty(),
        "stdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    // The first one is untouched.
    let mut l = Link::connect(&a.path);
    l.open(1);
    l.send(1, &Msg::Data(b"first"));
    assert_eq!(l.recv(), Some((1, Got::Data(b"first".to_vec()))));
}

#[test]
fn not_a_socket_is_left_alone() {
    let dir = temp_dir("notsock");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("1_7"), b"precious").unwrap();
    let out = agent_cmd(&dir, &["echo"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a socket"));
    assert_eq!(std::fs::read(dir.join("1_7")).unwrap(), b"precious");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn sigterm_and_sigint_remove_the_socket_and_exit_0() {
    for sig in [libc::SIGTERM, libc::SIGINT] {
        let mut a = AgentProc::start(&temp_dir("sig"), &["echo"]);
        let mut l = Link::connect(&a.path);
        l.open(1);
        l.send(1, &Msg::Data(b"x"));
        assert_eq!(l.recv(), Some((1, Got::Data(b"x".to_vec()))));
        a.signal(sig);
        let st = a.wait();
        assert_eq!(st.code(), Some(0), "signal {sig}: {st:?}");
        assert!(!a.path.exists(), "socket file left behind");
        l.expect_eof();
    }
}

// ---------------------------------------------------------------------------------------------
// claw-agent exec

#[test]
fn exec_cat_echoes_per_session() {
    let a = AgentProc::start(&temp_dir("cat"), &["exec", "--", "cat"]);
    let mut l = Link::connect(&a.path);
    l.open(1);
    l.send(1, &Msg::Data(b"hello cat\n"));
    assert_eq!(l.recv_data_bytes(1, 10), b"hello cat\n");
    l.open(2);
    l.send(2, &Msg::Data(b"second\n"));
    assert_eq!(l.recv_data_bytes(2, 7), b"second\n");
    // Closing session 1 kills its cat; session 2 keeps working.
    l.send(1, &Msg::Close(CloseReason::Normal));
    l.send(2, &Msg::Data(b"more\n"));
    assert_eq!(l.recv_data_bytes(2, 5), b"more\n");
}

#[test]
fn exec_process_exit_sends_output_then_close() {
    let a = AgentProc::start(
        &temp_dir("sh"),
        &["exec", "--", "sh", "-c", "echo hi; echo err >&2; exit 3"],
    );
    let mut l = Link::connect(&a.path);
    l.open(4);
    let mut out = Vec::new();
    loop {
        match l.recv() {
            Some((4, Got::Data(d))) => out.extend_from_slice(&d),
            Some((4, Got::Close(r))) => {
                assert_eq!(r, CloseReason::Normal);
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    let out = String::from_utf8(out).unwrap();
    assert!(out.contains("hi\n") && out.contains("err\n"), "{out:?}");
}

#[test]
fn exec_sh_echo_hi() {
    let a = AgentProc::start(
        &temp_dir("hi"),
        &["exec", "--", "sh", "-c", "echo hi; exit 0"],
    );
    let mut l = Link::connect(&a.path);
    l.open(1);
    assert_eq!(l.recv(), Some((1, Got::Data(b"hi\n".to_vec()))));
    assert_eq!(l.recv(), Some((1, Got::Close(CloseReason::Normal))));
}

#[test]
fn exec_sees_session_environment() {
    let a = AgentProc::start(
        &temp_dir("env"),
        &[
            "exec",
            "--",
            "sh",
            "-c",
            "printf '%s %s %s %s' \"$CLAW_TENANT\" \"$CLAW_AGENT\" \"$CLAW_SESSION\" \"$CLAW_PEER\"",
        ],
    );
    let mut l = Link::connect(&a.path);
    l.open(42);
    let want = b"1 7 42 127.0.0.1:50000";
    assert_eq!(l.recv_data_bytes(42, want.len()), want);
    assert_eq!(l.recv(), Some((42, Got::Close(CloseReason::Normal))));
}

#[test]
fn exec_missing_command_closes_with_error() {
    let a = AgentProc::start(
        &temp_dir("missing"),
        &["exec", "--", "/nonexistent/claw-test-cmd"],
    );
    let mut l = Link::connect(&a.path);
    l.open(1);
    match l.recv() {
        Some((1, Got::Data(d))) => {
            assert!(String::from_utf8_lossy(&d).contains("cannot run"))
        }
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(l.recv(), Some((1, Got::Close(CloseReason::Error))));
}

// ---------------------------------------------------------------------------------------------
// The SDK in-process, with a custom Agent

#[derive(Debug, PartialEq, Eq)]
enum Ev {
    Open(SessionId, OpenInfo),
    Data(SessionId, Vec<u8>),
    Resize(SessionId, u16, u16),
    Detached(SessionId),
    Attached(SessionId),
    Pause(SessionId),
    Continue(SessionId),
    Close(SessionId, CloseReason),
    LinkClosed,
}

/// Records every event; replies to DATA `quit` by closing the session from another thread,
/// to `big` with 2.5 MiB, and to anything else by echoing it.
struct Recorder(mpsc::Sender<Ev>);

impl Agent for Recorder {
    fn open(&mut self, s: SessionId, info: &OpenInfo, _out: &Outbox) {
        let _ = self.0.send(Ev::Open(s, info.clone()));
    }
    fn data(&mut self, s: SessionId, bytes: &[u8], out: &Outbox) {
        let _ = self.0.send(Ev::Data(s, bytes.to_vec()));
        match bytes {
            b"quit" => {
                let out = out.clone();
                std::thread::spawn(move || {
                    out.data(s, b"bye").unwrap();
                    out.close(s, CloseReason::Refused).unwrap();
                    // Dropped silently after CLOSE.
                    out.data(s, b"ghost").unwrap();
                    assert!(!out.is_open(s));
                })
                .join()
                .unwrap();
            }
            b"big" => out.data(s, &vec![b'z'; MAX_BODY * 5 / 2]).unwrap(),
            _ => out.data(s, bytes).unwrap(),
        }
    }
    fn resize(&mut self, s: SessionId, cols: u16, rows: u16, _out: &Outbox) {
        let _ = self.0.send(Ev::Resize(s, cols, rows));
    }
    fn detached(&mut self, s: SessionId, _out: &Outbox) {
        let _ = self.0.send(Ev::Detached(s));
    }
    fn attached(&mut self, s: SessionId, _out: &Outbox) {
        let _ = self.0.send(Ev::Attached(s));
    }
    fn pause(&mut self, s: SessionId, out: &Outbox) {
        assert!(out.is_paused(s));
        let _ = self.0.send(Ev::Pause(s));
    }
    fn resume_output(&mut self, s: SessionId, out: &Outbox) {
        assert!(!out.is_paused(s));
        let _ = self.0.send(Ev::Continue(s));
    }
    fn close(&mut self, s: SessionId, reason: CloseReason, _out: &Outbox) {
        let _ = self.0.send(Ev::Close(s, reason));
    }
    fn link_closed(&mut self, out: &Outbox) {
        assert!(!out.link_open());
        assert!(out.data(1, b"late").is_err());
        let _ = self.0.send(Ev::LinkClosed);
    }
}

#[test]
fn sdk_in_process_with_a_custom_agent() {
    let dir = temp_dir("sdk");
    let listener = AgentListener::bind(&dir, 1, 7).unwrap();
    let path = listener.path().to_owned();
    assert_eq!(path, dir.join("1_7"));
    // A second bind on the same path is refused while the first listens.
    let err = AgentListener::bind(&dir, 1, 7).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse);
    assert!(err.to_string().contains("already listening"), "{err}");

    let (tx, rx) = mpsc::channel();
    let tx = std::sync::Mutex::new(tx);
    let stop = Arc::new(AtomicBool::new(false));
    let server = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let r = listener.serve(
                move || Recorder(tx.lock().unwrap().clone()),
                Arc::clone(&stop),
            );
            drop(listener);
            r
        })
    };
    let ev = || rx.recv_timeout(TIMEOUT).expect("no event");

    let mut l = Link::connect(&path);
    l.open(1);
    l.send(
        2,
        &Msg::Reopen(Open {
            tenant: 1,
            agent: 7,
            client_caps: 0,
            peer: "[::1]:9",
        }),
    );
    assert_eq!(
        ev(),
        Ev::Open(
            1,
            OpenInfo {
                tenant: 1,
                agent: 7,
                client_caps: 3,
                peer: "127.0.0.1:50000".into(),
                reopen: false
            }
        )
    );
    assert!(
        matches!(ev(), Ev::Open(2, OpenInfo { reopen: true, ref peer, .. }) if peer == "[::1]:9")
    );

    l.send(
        1,
        &Msg::Resize {
            cols: 120,
            rows: 40,
        },
    );
    l.send(1, &Msg::Detached);
    l.send(1, &Msg::Attached);
    l.send(
        1,
        &Msg::Unknown {
            ty: 0x77,
            body: b"?",
        },
    ); // ignored
    l.send(3, &Msg::Data(b"unknown session")); // ignored
    assert_eq!(ev(), Ev::Resize(1, 120, 40));
    assert_eq!(ev(), Ev::Detached(1));
    assert_eq!(ev(), Ev::Attached(1));

    // PAUSE holds session 1's output; session 2 is unaffected; CONTINUE flushes in order.
    l.send(1, &Msg::Pause);
    l.send(1, &Msg::Data(b"held-1"));
    l.send(1, &Msg::Data(b"held-2"));
    l.send(2, &Msg::Data(b"free"));
    assert_eq!(l.recv(), Some((2, Got::Data(b"free".to_vec()))));
    assert_eq!(ev(), Ev::Pause(1));
    l.send(1, &Msg::Continue);
    assert_eq!(l.recv(), Some((1, Got::Data(b"held-1".to_vec()))));
    assert_eq!(l.recv(), Some((1, Got::Data(b"held-2".to_vec()))));
    assert_eq!(ev(), Ev::Data(1, b"held-1".to_vec()));
    assert_eq!(ev(), Ev::Data(1, b"held-2".to_vec()));
    assert_eq!(ev(), Ev::Data(2, b"free".to_vec()));
    assert_eq!(ev(), Ev::Continue(1));

    // Bodies over 1 MiB are split.
    l.send(1, &Msg::Data(b"big"));
    let mut sizes = Vec::new();
    while sizes.iter().sum::<usize>() < MAX_BODY * 5 / 2 {
        match l.recv() {
            Some((1, Got::Data(d))) => sizes.push(d.len()),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(sizes, vec![MAX_BODY, MAX_BODY, MAX_BODY / 2]);
    assert_eq!(ev(), Ev::Data(1, b"big".to_vec()));

    // The agent closes session 2 from another thread: DATA, then CLOSE, nothing after.
    l.send(2, &Msg::Data(b"quit"));
    assert_eq!(l.recv(), Some((2, Got::Data(b"bye".to_vec()))));
    assert_eq!(l.recv(), Some((2, Got::Close(CloseReason::Refused))));
    assert_eq!(ev(), Ev::Data(2, b"quit".to_vec()));
    l.send(2, &Msg::Data(b"after our close")); // not delivered to the agent
    l.send(2, &Msg::Close(CloseReason::Normal)); // crossing CLOSE: not delivered either

    // The daemon closes session 1.
    l.send(1, &Msg::Close(CloseReason::SuspendExpired));
    assert_eq!(ev(), Ev::Close(1, CloseReason::SuspendExpired));

    // A CLOSE while paused waits for CONTINUE behind the held DATA.
    l.open(5);
    assert!(matches!(ev(), Ev::Open(5, _)));
    l.send(5, &Msg::Pause);
    assert_eq!(ev(), Ev::Pause(5));
    l.send(5, &Msg::Data(b"quit"));
    assert_eq!(ev(), Ev::Data(5, b"quit".to_vec()));
    l.open(6);
    assert!(matches!(ev(), Ev::Open(6, _)));
    l.send(6, &Msg::Data(b"marker"));
    assert_eq!(l.recv(), Some((6, Got::Data(b"marker".to_vec()))));
    l.send(5, &Msg::Continue);
    assert_eq!(l.recv(), Some((5, Got::Data(b"bye".to_vec()))));
    assert_eq!(l.recv(), Some((5, Got::Close(CloseReason::Refused))));
    assert_eq!(ev(), Ev::Data(6, b"marker".to_vec()));

    // Link EOF: link_closed.
    drop(l);
    assert_eq!(ev(), Ev::LinkClosed);

    // Stopping shuts open links down and returns; dropping the listener removes the socket.
    let mut l2 = Link::connect(&path);
    l2.open(1);
    assert!(matches!(ev(), Ev::Open(1, _)));
    stop.store(true, Ordering::SeqCst);
    server.join().unwrap().unwrap();
    assert_eq!(ev(), Ev::LinkClosed);
    l2.expect_eof();
    assert!(!path.exists(), "socket file left behind");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn sdk_serve_link_over_a_socket_pair() {
    struct Upper;
    impl Agent for Upper {
        fn data(&mut self, s: SessionId, bytes: &[u8], out: &Outbox) {
            let _ = out.data(s, &bytes.to_ascii_uppercase());
        }
    }
    let (ours, theirs) = UnixStream::pair().unwrap();
    let t = std::thread::spawn(move || clawterm_agent::serve_link(theirs, Upper));
    ours.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut l = Link {
        stream: ours,
        buf: Vec::new(),
    };
    l.send(
        0,
        &Msg::Hello {
            version: 1,
            name: "",
        },
    );
    assert!(matches!(l.recv(), Some((0, Got::Hello(1, _)))));
    l.open(1);
    l.send(1, &Msg::Data(b"shout"));
    assert_eq!(l.recv(), Some((1, Got::Data(b"SHOUT".to_vec()))));
    drop(l);
    t.join().unwrap().unwrap();

    // A non-HELLO first message: InvalidData, link closed.
    let (ours, theirs) = UnixStream::pair().unwrap();
    let t = std::thread::spawn(move || clawterm_agent::serve_link(theirs, Upper));
    let mut l = Link {
        stream: ours,
        buf: Vec::new(),
    };
    l.stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    l.send(1, &Msg::Data(b"no hello"));
    l.expect_eof();
    let err = t.join().unwrap().unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
    assert!(err.to_string().contains("not HELLO"), "{err}");
}

fn read_pids(l: &mut Link, sid: u32, n: usize) -> Vec<i32> {
    let mut text = String::new();
    while text.lines().count() < n || !text.ends_with('\n') {
        match l.recv() {
            Some((s, Got::Data(d))) if s == sid => text.push_str(&String::from_utf8(d).unwrap()),
            other => panic!("unexpected {other:?}"),
        }
    }
    // Pids wrap quickly on a busy machine: pin each to the process it is now.
    text.lines()
        .map(|p| remember(p.trim().parse().unwrap()))
        .collect()
}

/// Link loss with `--daemon-grace 0` (the default keeps the session for a restarted daemon's
/// REOPEN: see `clawterm_agent`'s own tests).
#[test]
fn exec_close_and_link_loss_kill_the_process_group() {
    // The shell prints its pid and its background child's pid, then waits.
    let script = "sleep 1000 & echo $$; echo $!; wait";
    let a = AgentProc::start_with(
        &temp_dir("kill"),
        &["--daemon-grace", "0"],
        &["exec", "--", "sh", "-c", script],
    );
    let mut l = Link::connect(&a.path);
    l.open(1);
    let pids = read_pids(&mut l, 1, 2);
    assert!(!dead(pids[0]) && !dead(pids[1]));
    l.send(1, &Msg::Close(CloseReason::ClientDisconnect));
    for &p in &pids {
        wait_dead(p, TIMEOUT);
    }

    l.open(2);
    let pids = read_pids(&mut l, 2, 2);
    drop(l);
    for &p in &pids {
        wait_dead(p, TIMEOUT);
    }
}

/// VmRSS of a process, KiB.
fn rss_kib(pid: u32) -> u64 {
    harness::rss_kib(pid).expect("VmRSS in /proc status")
}

/// A program that never reads its stdin, flooded with 64 MiB of input by a daemon that ignores
/// the agent's PAUSE: the agent keeps reading the link (every write completes and another
/// session on it keeps echoing), PAUSEs the stuck session's input once (POD-LINK.md §4: pod →
/// daemon), queues at most `INPUT_HARD_LIMIT` for the stuck program and discards the rest (a
/// daemon that ignores PAUSE breaks the contract), tells the session nothing, and its memory
/// stays bounded (the old unbounded queue grew by the whole 64 MiB).
#[test]
fn exec_input_for_a_program_that_never_reads_is_bounded() {
    let a = AgentProc::start(
        &temp_dir("noread"),
        &[
            "exec",
            "--",
            "sh",
            "-c",
            "read -r m; if [ \"$m\" = stuck ]; then exec sleep 120; else exec cat; fi",
        ],
    );
    let mut l = Link::connect(&a.path);
    // A hang (the agent no longer reading the link) becomes a failure, not a stall.
    l.stream.set_write_timeout(Some(TIMEOUT)).unwrap();
    l.open(1);
    l.send(1, &Msg::Data(b"stuck\n"));
    l.open(2);
    l.send(2, &Msg::Data(b"echo\nping-0\n"));
    assert_eq!(l.recv_data_bytes(2, 7), b"ping-0\n");
    let rss0 = rss_kib(a.child.id());
    let mut peak = rss0;
    let chunk = vec![b'x'; 64 * 1024];
    let mut told = Vec::new();
    let mut pauses = 0;
    let t0 = Instant::now();
    for i in 1..=16 {
        for _ in 0..64 {
            l.send(1, &Msg::Data(&chunk)); // 4 MiB per round
        }
        let ping = format!("ping-{i}\n");
        l.send(2, &Msg::Data(ping.as_bytes()));
        let mut echoed = Vec::new();
        while echoed.len() < ping.len() {
            match l.recv() {
                Some((2, Got::Data(d))) => echoed.extend_from_slice(&d),
                Some((1, Got::Data(d))) => told.extend_from_slice(&d),
                Some((1, Got::Other(0x40))) => pauses += 1,
                other => panic!("round {i}: unexpected {other:?}"),
            }
        }
        assert_eq!(echoed, ping.as_bytes(), "round {i}");
        peak = peak.max(rss_kib(a.child.id()));
    }
    let took = t0.elapsed();
    println!(
        "64 MiB to a program that never reads, in {took:?}: claw-agent VmRSS {rss0} KiB before, peak {peak} KiB; {pauses} PAUSE"
    );
    assert_eq!(pauses, 1, "the stuck session's input is PAUSEd once");
    assert!(
        told.is_empty(),
        "nothing is written into the session: {told:?}"
    );
    assert!(
        peak < rss0 + 16 * 1024,
        "claw-agent grew from {rss0} KiB to {peak} KiB for 64 MiB of unread input"
    );
    // Closing the stuck session ends it; the other one still works.
    l.send(1, &Msg::Close(CloseReason::Normal));
    l.send(2, &Msg::Data(b"after\n"));
    assert_eq!(l.recv_data_bytes(2, 6), b"after\n");
}

/// A program that reads its stdin late: 2 MiB of input PAUSE the session's input (pod →
/// daemon) once more than `INPUT_HIGH` waits, and once the program has read it down below
/// `INPUT_LOW` the agent sends CONTINUE; nothing is lost (the program counts every byte).
#[test]
fn exec_input_pauses_and_continues() {
    let a = AgentProc::start(
        &temp_dir("slowread"),
        &["exec", "--", "sh", "-c", "sleep 1; head -c 2097152 | wc -c"],
    );
    let mut l = Link::connect(&a.path);
    l.stream.set_write_timeout(Some(TIMEOUT)).unwrap();
    l.open(1);
    let chunk = vec![b'y'; 64 * 1024];
    for _ in 0..32 {
        l.send(1, &Msg::Data(&chunk));
    }
    let mut order = Vec::new();
    let mut out = Vec::new();
    loop {
        match l.recv() {
            Some((1, Got::Other(c))) => order.push(c),
            Some((1, Got::Data(d))) => out.extend_from_slice(&d),
            Some((1, Got::Close(_))) | None => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(
        order,
        [0x40, 0x41],
        "PAUSE, then CONTINUE once the program read it down"
    );
    assert_eq!(
        String::from_utf8_lossy(&out).trim(),
        "2097152",
        "every byte reached the program"
    );
}
