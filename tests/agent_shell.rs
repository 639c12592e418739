//! `claw-agent shell` (POD-LINK.md §6): the real binary, driven by a fake daemon that speaks
//! the pod link over its Unix socket with `clawterm::podlink`. Sessions run `/bin/sh` as a
//! login shell in a PTY.
//!
//! Markers the tests wait for are computed by the shell (`$((40+2))`), so the terminal's echo
//! of the typed command never matches them.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clawterm::podlink::{decode, encode, CloseReason, Decoded, Msg, Open};

use clawterm_testkit as harness;

use harness::{dead, first_line, remember, temp_path, wait_dead};

/// Upper bound for anything the tests wait for.
const TIMEOUT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------------------
// Helpers

fn temp_dir(name: &str) -> PathBuf {
    let d = temp_path(&format!("agent-shell-{name}"));
    std::fs::create_dir_all(&d).expect("create the test directory");
    d
}

/// `claw-agent -s SOCK --tenant 1 --agent 7 OPTS shell --shell SHELL` with a predictable login
/// shell (HOME `home`, no user profile, no $ENV file, the default TERM); returns the child and
/// the first line it prints (empty if none within [`TIMEOUT`]).
fn spawn_shell_agent(sock: &Path, shell: &Path, home: &Path, opts: &[&str]) -> (Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_claw-agent"))
        .arg("-s")
        .arg(sock)
        .args(["--tenant", "1", "--agent", "7"])
        .args(opts)
        .args(["shell", "--shell"])
        .arg(shell)
        .env("RUST_LOG", "warn")
        .env("HOME", home)
        .env_remove("ENV")
        .env_remove("TERM")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start claw-agent");
    let line = first_line(&mut child, TIMEOUT);
    (child, line)
}

/// A running `claw-agent ... shell --shell /bin/sh`, killed and cleaned up on drop.
struct AgentProc {
    child: Child,
    dir: PathBuf,
    path: PathBuf,
}

impl AgentProc {
    fn start(name: &str) -> AgentProc {
        AgentProc::start_with(name, &[])
    }

    /// With `opts` before the mode (e.g. `--daemon-grace 0`).
    fn start_with(name: &str, opts: &[&str]) -> AgentProc {
        let dir = temp_dir(name);
        let home = dir.join("home");
        std::fs::create_dir_all(&home).expect("create HOME");
        let (child, line) = spawn_shell_agent(&dir.join("sock"), Path::new("/bin/sh"), &home, opts);
        let path = dir.join("sock").join("1_7");
        let agent = AgentProc { child, dir, path };
        assert_eq!(
            line.trim_end(),
            format!(
                "claw-agent listening on {} (mode shell)",
                agent.path.display()
            )
        );
        agent
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The fake daemon's side of one link: collects every session's output and CLOSE.
struct Daemon {
    stream: UnixStream,
    buf: Vec<u8>,
    out: HashMap<u32, Vec<u8>>,
    closed: HashMap<u32, CloseReason>,
    /// DATA received for a session after its CLOSE (must stay empty).
    after_close: Vec<u32>,
    /// PAUSE (true) and CONTINUE (false) of each session's input, in order.
    input_flow: HashMap<u32, Vec<bool>>,
    eof: bool,
}

impl Daemon {
    /// Connects and does the HELLO exchange.
    fn connect(path: &Path) -> Daemon {
        let stream = UnixStream::connect(path).expect("connect to the agent");
        let mut d = Daemon {
            stream,
            buf: Vec::new(),
            out: HashMap::new(),
            closed: HashMap::new(),
            after_close: Vec::new(),
            input_flow: HashMap::new(),
            eof: false,
        };
        d.send(
            0,
            &Msg::Hello {
                version: 1,
                name: "fake-clawtermd",
            },
        );
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some((sid, msg)) = d.next_raw() {
                match msg {
                    Msg::Hello { version, name } => {
                        assert_eq!((sid, version, name), (0, 1, "claw-agent"));
                        let used = d.used_of_first();
                        d.buf.drain(..used);
                        return d;
                    }
                    other => panic!("expected HELLO, got {:?}", other.ty()),
                }
            }
            assert!(Instant::now() < deadline, "no HELLO from the agent");
            d.read_some(Duration::from_millis(100));
        }
    }

    /// The first whole message in the buffer, if any (not consumed).
    fn next_raw(&self) -> Option<(u32, Msg<'_>)> {
        match decode(&self.buf).expect("agent sent a malformed message") {
            Decoded::Msg {
                session_id, msg, ..
            } => Some((session_id, msg)),
            Decoded::NeedMore(_) => None,
        }
    }

    fn used_of_first(&self) -> usize {
        match decode(&self.buf) {
            Ok(Decoded::Msg { used, .. }) => used,
            _ => 0,
        }
    }

    /// Reads what the socket has within `wait` into the buffer. Returns bytes read.
    fn read_some(&mut self, wait: Duration) -> usize {
        if self.eof {
            std::thread::sleep(wait);
            return 0;
        }
        let wait = wait.max(Duration::from_millis(1));
        self.stream
            .set_read_timeout(Some(wait))
            .expect("set a read timeout");
        let mut chunk = [0u8; 65536];
        match self.stream.read(&mut chunk) {
            Ok(0) => {
                self.eof = true;
                0
            }
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                n
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) =>
            {
                0
            }
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                self.eof = true;
                0
            }
            Err(e) => panic!("read from the agent: {e}"),
        }
    }

    /// Takes every whole message out of the buffer. Returns the DATA bytes taken.
    fn dispatch(&mut self) -> usize {
        let mut data = 0;
        loop {
            let (sid, used, got) = match decode(&self.buf).expect("agent sent a malformed message")
            {
                Decoded::NeedMore(_) => return data,
                Decoded::Msg {
                    session_id,
                    msg,
                    used,
                } => {
                    let got = match msg {
                        Msg::Data(d) => Ok(d.to_vec()),
                        Msg::Close(r) => Err(Some(r)),
                        Msg::Hello { .. } => panic!("a second HELLO"),
                        Msg::Pause | Msg::Continue => {
                            let flow = self.input_flow.entry(session_id).or_default();
                            flow.push(matches!(msg, Msg::Pause));
                            Err(None)
                        }
                        _ => Err(None), // nothing else is expected from an agent; ignore
                    };
                    (session_id, used, got)
                }
            };
            self.buf.drain(..used);
            match got {
                Ok(d) => {
                    if self.closed.contains_key(&sid) {
                        self.after_close.push(sid);
                    }
                    data += d.len();
                    self.out.entry(sid).or_default().extend_from_slice(&d);
                }
                Err(Some(r)) => {
                    assert!(
                        self.closed.insert(sid, r).is_none(),
                        "two CLOSEs for session {sid}"
                    );
                }
                Err(None) => {}
            }
        }
    }

    /// Receives for `wait`. Returns the DATA bytes received meanwhile.
    fn pump(&mut self, wait: Duration) -> usize {
        let deadline = Instant::now() + wait;
        let mut data = self.dispatch();
        loop {
            let now = Instant::now();
            if now >= deadline {
                return data;
            }
            self.read_some(deadline - now);
            data += self.dispatch();
        }
    }

    fn send(&mut self, sid: u32, msg: &Msg<'_>) {
        let mut v = Vec::new();
        encode(&mut v, sid, msg);
        self.stream.write_all(&v).expect("write to the agent");
    }

    fn open(&mut self, sid: u32) {
        self.send(
            sid,
            &Msg::Open(Open {
                tenant: 1,
                agent: 7,
                client_caps: 3,
                peer: "127.0.0.1:50000",
            }),
        );
    }

    fn input(&mut self, sid: u32, text: &str) {
        self.send(sid, &Msg::Data(text.as_bytes()));
    }

    /// PAUSEs of `sid`'s input received so far.
    fn pauses(&self, sid: u32) -> usize {
        self.input_flow
            .get(&sid)
            .map_or(0, |f| f.iter().filter(|&&p| p).count())
    }

    /// Bytes of output received so far for `sid`.
    fn mark(&self, sid: u32) -> usize {
        self.out.get(&sid).map_or(0, Vec::len)
    }

    /// Output of `sid` from byte `from` on, as text.
    fn text(&self, sid: u32, from: usize) -> String {
        let all = self.out.get(&sid).map_or(&[][..], Vec::as_slice);
        String::from_utf8_lossy(&all[from.min(all.len())..]).into_owned()
    }

    /// Receives until the output of `sid` from byte `from` on contains `needle`; returns that
    /// output. Panics (showing it) after [`TIMEOUT`].
    fn wait_for(&mut self, sid: u32, from: usize, needle: &str) -> String {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            self.dispatch();
            let text = self.text(sid, from);
            if text.contains(needle) {
                return text;
            }
            assert!(
                Instant::now() < deadline && !self.eof,
                "session {sid}: no {needle:?} in {text:?}"
            );
            self.read_some(Duration::from_millis(100));
        }
    }

    /// Receives until `sid` is closed by the agent; returns the reason.
    fn wait_close(&mut self, sid: u32) -> CloseReason {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            self.dispatch();
            if let Some(r) = self.closed.get(&sid) {
                return *r;
            }
            assert!(
                Instant::now() < deadline && !self.eof,
                "session {sid} not closed; output {:?}",
                self.text(sid, 0)
            );
            self.read_some(Duration::from_millis(100));
        }
    }

    /// Runs `cmd` in `sid` and waits for it to print `marker` and for the next prompt;
    /// returns the output since.
    fn run(&mut self, sid: u32, cmd: &str, marker: &str) -> String {
        let from = self.mark(sid);
        self.input(sid, &format!("{cmd}\n"));
        self.wait_marker_then_prompt(sid, from, marker);
        self.text(sid, from)
    }

    /// Waits for `marker` in the output of `sid` from byte `from` on, then for a prompt after it.
    fn wait_marker_then_prompt(&mut self, sid: u32, from: usize, marker: &str) {
        let text = self.wait_for(sid, from, marker);
        let at = text.find(marker).map_or(0, |i| i + marker.len());
        self.wait_prompt(sid, from + at);
    }

    /// Waits until the output of `sid` ends with a prompt (`$ ` or `# `) printed after byte
    /// `from` (so that the next command's output doesn't share a line with the prompt).
    fn wait_prompt(&mut self, sid: u32, from: usize) {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            self.dispatch();
            let text = self.text(sid, from);
            if text.ends_with("$ ") || text.ends_with("# ") {
                return;
            }
            assert!(
                Instant::now() < deadline && !self.eof,
                "session {sid}: no prompt after {text:?}"
            );
            self.read_some(Duration::from_millis(100));
        }
    }

    /// Waits until the shell of `sid` is up and returns its pid.
    fn shell_pid(&mut self, sid: u32) -> i32 {
        let text = self.run(sid, "echo shpid=$$ ready-$((1+1))", "ready-2");
        find_number(&text, "shpid=").expect("the shell's pid")
    }
}

/// The number right after the first `key` that is followed by a digit (all of them are pids
/// here: remembered at once, see `harness::remember`).
fn find_number(text: &str, key: &str) -> Option<i32> {
    text.match_indices(key).find_map(|(i, _)| {
        let digits: String = text[i + key.len()..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        digits.parse().ok().map(remember)
    })
}

/// The lines of `text` that are exactly a decimal number (terminal line ends: `\r\n`).
fn numbers(text: &str) -> Vec<u32> {
    text.split('\n')
        .filter_map(|l| {
            let l = l.trim_end_matches('\r');
            if !l.is_empty() && l.bytes().all(|b| b.is_ascii_digit()) {
                l.parse().ok()
            } else {
                None
            }
        })
        .collect()
}

fn assert_sequence(got: &[u32], n: u32) {
    if got.len() != n as usize || got.iter().zip(1..=n).any(|(a, b)| *a != b) {
        let bad = got
            .iter()
            .zip(1..=n)
            .position(|(a, b)| *a != b)
            .unwrap_or(got.len().min(n as usize));
        panic!(
            "expected 1..={n} once each in order; got {} numbers, first difference at index {bad}: {:?}",
            got.len(),
            &got[bad.saturating_sub(3)..(bad + 3).min(got.len())]
        );
    }
}

/// A live process of session `sid` whose command line starts with `argv0`.
fn find_in_session(sid: i32, argv0: &str) -> Option<i32> {
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some((_, rest)) = stat.rsplit_once(") ") else {
            continue;
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        if f.len() < 4 || f[0] == "Z" || f[3] != sid.to_string() {
            continue;
        }
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if cmdline.split(|b| *b == 0).next() == Some(argv0.as_bytes()) {
            return Some(pid);
        }
    }
    None
}

// ---------------------------------------------------------------------------------------------
// Tests

#[test]
fn echo_env_and_login_shell() {
    let a = AgentProc::start("echo");
    let mut d = Daemon::connect(&a.path);
    d.open(1);
    d.run(1, "echo hello-$((40+2))", "hello-42");
    let text = d.run(
        1,
        "echo \"a0=$0 term=$TERM s=$CLAW_SESSION t=$CLAW_TENANT a=$CLAW_AGENT p=$CLAW_PEER\" end-$((2*3))",
        "end-6",
    );
    assert!(
        text.contains("a0=-sh term=xterm-256color s=1 t=1 a=7 p=127.0.0.1:50000"),
        "{text:?}"
    );
    // A real terminal, of the default size.
    let text = d.run(1, "tty; stty size; echo end-$((3*3))", "end-9");
    assert!(text.contains("/dev/pts/"), "{text:?}");
    assert!(text.contains("24 80"), "{text:?}");
    assert!(d.closed.is_empty());
}

#[test]
fn resize_sets_the_window_size() {
    let a = AgentProc::start("resize");
    let mut d = Daemon::connect(&a.path);
    d.open(1);
    d.shell_pid(1);
    d.send(
        1,
        &Msg::Resize {
            cols: 100,
            rows: 30,
        },
    );
    let text = d.run(1, "stty size; echo end-$((4*4))", "end-16");
    assert!(text.contains("30 100"), "{text:?}");
    // The terminal's foreground program gets SIGWINCH.
    let from = d.mark(1);
    d.input(
        1,
        "sh -c 'trap \"echo winch-\\$((5*5)); exit\" WINCH; while :; do sleep 0.1; done'\n",
    );
    d.pump(Duration::from_millis(500));
    d.send(1, &Msg::Resize { cols: 90, rows: 20 });
    d.wait_marker_then_prompt(1, from, "winch-25");
    let text = d.run(1, "stty size; echo end-$((7*7))", "end-49");
    assert!(text.contains("20 90"), "{text:?}");
}

#[test]
fn output_keeps_flowing_while_detached_nothing_lost() {
    let a = AgentProc::start("detach");
    let mut d = Daemon::connect(&a.path);
    d.open(1);
    d.shell_pid(1);
    let from = d.mark(1);
    d.input(1, "sleep 1; seq 1 20000; echo end-$((6*7))\n");
    d.send(1, &Msg::Detached);
    d.pump(Duration::from_millis(2000));
    d.send(1, &Msg::Attached);
    let text = d.wait_for(1, from, "end-42");
    assert_sequence(&numbers(&text), 20000);
    // Still alive and well.
    d.run(1, "echo again-$((8*8))", "again-64");
    assert!(d.closed.is_empty());
}

#[test]
fn pause_stops_reading_the_pty_and_continue_resumes_without_loss() {
    let a = AgentProc::start("pause");
    let mut d = Daemon::connect(&a.path);
    d.open(1);
    let sh = d.shell_pid(1);
    let from = d.mark(1);
    d.send(1, &Msg::Pause);
    d.input(1, "seq 1 200000; echo end-$((6*7))\n");
    let first = d.pump(Duration::from_millis(1000));
    assert!(first < 64 * 1024, "{first} bytes arrived while paused");
    // Back-pressure, not buffering: `seq` (1.4 MB of output) is still blocked on the terminal.
    let deadline = Instant::now() + Duration::from_secs(5);
    let seq = loop {
        if let Some(p) = find_in_session(sh, "seq") {
            break p;
        }
        assert!(
            Instant::now() < deadline,
            "seq is not running while the session is paused"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let second = d.pump(Duration::from_millis(1000));
    assert_eq!(second, 0, "output arrived a second after PAUSE");
    assert!(!dead(seq), "seq finished while the session was paused");
    d.send(1, &Msg::Continue);
    let text = d.wait_for(1, from, "end-42");
    assert_sequence(&numbers(&text), 200000);
    wait_dead(seq, TIMEOUT);
    assert!(d.closed.is_empty());
}

#[test]
fn exit_closes_the_session_after_its_output() {
    let a = AgentProc::start("exit");
    let mut d = Daemon::connect(&a.path);
    d.open(1);
    let sh = d.shell_pid(1);
    let from = d.mark(1);
    d.input(1, "echo bye-$((2+3)); exit\n");
    assert_eq!(d.wait_close(1), CloseReason::Normal);
    assert!(d.text(1, from).contains("bye-5"), "{:?}", d.text(1, from));
    wait_dead(sh, TIMEOUT);
    d.pump(Duration::from_millis(300));
    assert!(d.after_close.is_empty(), "DATA after CLOSE");

    // The session id can be used again, for a fresh shell.
    d.closed.clear();
    d.out.clear();
    d.open(1);
    let sh2 = d.shell_pid(1);
    assert_ne!(sh, sh2);
    d.input(1, "exit 3\n");
    assert_eq!(d.wait_close(1), CloseReason::Normal);
}

#[test]
fn exit_while_paused_closes_after_continue_with_all_output() {
    let a = AgentProc::start("exitpause");
    let mut d = Daemon::connect(&a.path);
    d.open(1);
    d.shell_pid(1);
    let from = d.mark(1);
    d.send(1, &Msg::Pause);
    d.input(1, "seq 1 3000; exit\n");
    d.pump(Duration::from_millis(1000));
    assert!(d.closed.is_empty(), "CLOSE while paused");
    d.send(1, &Msg::Continue);
    assert_eq!(d.wait_close(1), CloseReason::Normal);
    assert_sequence(&numbers(&d.text(1, from)), 3000);
}

#[test]
fn close_from_the_daemon_kills_the_shell_and_its_jobs() {
    let a = AgentProc::start("close");
    let mut d = Daemon::connect(&a.path);
    d.open(1);
    let sh = d.shell_pid(1);
    let text = d.run(1, "sleep 1000 & echo bg=$! end-$((5+5))", "end-10");
    let bg = find_number(&text, "bg=").expect("the background job's pid");
    // A job that ignores SIGHUP gets SIGKILL after the grace period.
    let text = d.run(
        1,
        "sh -c 'trap \"\" HUP; sleep 1000' & echo hupless=$! end-$((5+6))",
        "end-11",
    );
    let hupless = find_number(&text, "hupless=").expect("the second job's pid");
    for p in [sh, bg, hupless] {
        assert!(!dead(p), "process {p} died early");
    }
    d.send(1, &Msg::Close(CloseReason::ClientDisconnect));
    wait_dead(sh, Duration::from_secs(5));
    wait_dead(bg, Duration::from_secs(5));
    wait_dead(hupless, Duration::from_secs(5));
    d.pump(Duration::from_millis(300));
    assert!(
        d.closed.is_empty(),
        "CLOSE sent back for a daemon-closed session"
    );
    assert!(d.after_close.is_empty());

    // The agent is fine: a new session works.
    d.open(2);
    d.run(2, "echo alive-$((9*9))", "alive-81");
}

/// With `--daemon-grace 0` (the default keeps them for a restarted daemon's REOPEN: see
/// `clawterm_agent`'s own tests).
#[test]
fn link_loss_kills_every_shell_of_the_link() {
    let a = AgentProc::start_with("linkloss", &["--daemon-grace", "0"]);
    let mut d = Daemon::connect(&a.path);
    d.open(1);
    d.open(2);
    let sh1 = d.shell_pid(1);
    let sh2 = d.shell_pid(2);
    let text = d.run(2, "sleep 1000 & echo bg=$! end-$((5+5))", "end-10");
    let bg = find_number(&text, "bg=").expect("the background job's pid");
    drop(d);
    for p in [sh1, sh2, bg] {
        wait_dead(p, Duration::from_secs(5));
    }
    // The agent still serves new links.
    let mut d = Daemon::connect(&a.path);
    d.open(1);
    d.run(1, "echo alive-$((9*9))", "alive-81");
}

#[test]
fn two_sessions_are_independent() {
    let a = AgentProc::start("two");
    let mut d = Daemon::connect(&a.path);
    d.open(1);
    d.open(2);
    let sh1 = d.shell_pid(1);
    let sh2 = d.shell_pid(2);
    assert_ne!(sh1, sh2);
    d.run(1, "V=first; echo set-$((1+1))", "set-2");
    d.run(2, "V=second; echo set-$((1+1))", "set-2");
    d.send(2, &Msg::Resize { cols: 50, rows: 10 });
    let t1 = d.run(1, "echo val-$V; stty size; echo end-$((3+4))", "end-7");
    let t2 = d.run(2, "echo val-$V; stty size; echo end-$((3+4))", "end-7");
    assert!(t1.contains("val-first") && t1.contains("24 80"), "{t1:?}");
    assert!(t2.contains("val-second") && t2.contains("10 50"), "{t2:?}");
    assert!(!d.text(1, 0).contains("val-second"));
    assert!(!d.text(2, 0).contains("val-first"));

    // A shell that doesn't read its input doesn't hold up the other session (or the link).
    d.input(1, "sleep 10\n");
    let pad = format!("#{}\n", "x".repeat(99)).repeat(2000); // 200 KB of comments
    d.input(1, &pad);
    let t0 = Instant::now();
    d.run(2, "echo quick-$((6+6))", "quick-12");
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());

    // Closing one leaves the other alone; the other's exit closes only itself.
    d.send(1, &Msg::Close(CloseReason::ClientDisconnect));
    wait_dead(sh1, Duration::from_secs(5));
    assert!(!dead(sh2));
    d.run(2, "echo still-$((7+7))", "still-14");
    d.input(2, "exit\n");
    assert_eq!(d.wait_close(2), CloseReason::Normal);
    assert!(!d.closed.contains_key(&1));
}

#[test]
fn missing_shell_closes_the_session_with_an_error() {
    let dir = temp_dir("missing");
    let (mut child, line) = spawn_shell_agent(&dir, &dir.join("no-such-shell"), &dir, &[]);
    assert!(line.contains("(mode shell)"), "{line:?}");
    let mut d = Daemon::connect(&dir.join("1_7"));
    d.open(1);
    assert_eq!(d.wait_close(1), CloseReason::Error);
    assert!(d.text(1, 0).contains("cannot run"), "{:?}", d.text(1, 0));
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
}

/// Open descriptors and threads of process `pid`.
fn fds_and_threads(pid: u32) -> (usize, usize) {
    let count = |what: &str| {
        std::fs::read_dir(format!("/proc/{pid}/{what}"))
            .map(|d| d.count())
            .unwrap_or(0)
    };
    (count("fd"), count("task"))
}

#[test]
fn ended_sessions_leave_no_descriptors_or_threads_behind() {
    let a = AgentProc::start("leak");
    let pid = a.child.id();
    let mut d = Daemon::connect(&a.path);
    // Warm up (a first session), then take the baseline.
    d.open(9);
    d.shell_pid(9);
    d.send(9, &Msg::Close(CloseReason::ClientDisconnect));
    let settle = |want: (usize, usize)| {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let now = fds_and_threads(pid);
            if now == want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "agent has {now:?} (fds, threads), expected {want:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    std::thread::sleep(Duration::from_millis(2500));
    let base = fds_and_threads(pid);

    for round in 0..2 {
        d.closed.clear();
        d.open(1);
        d.open(2);
        d.open(3);
        for sid in 1..=3 {
            d.shell_pid(sid);
        }
        // 1: the shell exits; 2: the daemon closes it; 3: a job ignoring SIGHUP, then closed.
        d.input(1, "exit\n");
        assert_eq!(d.wait_close(1), CloseReason::Normal, "round {round}");
        d.send(2, &Msg::Close(CloseReason::ClientDisconnect));
        d.run(
            3,
            "sh -c 'trap \"\" HUP; sleep 1000' & echo end-$((5+6))",
            "end-11",
        );
        d.send(3, &Msg::Close(CloseReason::ClientDisconnect));
        settle(base);
    }
}

/// VmRSS of a process, KiB.
fn rss_kib(pid: u32) -> u64 {
    harness::rss_kib(pid).expect("VmRSS in /proc status")
}

/// A foreground program that never reads the terminal, flooded with 32 MiB of input by a
/// daemon that ignores the agent's PAUSE: the terminal takes a few KiB, the agent PAUSEs the
/// session's input, queues at most `INPUT_HARD_LIMIT` and discards the rest (writing nothing
/// into the session), keeps reading the link (another session stays responsive) and its
/// memory stays bounded.
#[test]
fn input_for_a_program_that_never_reads_the_terminal_is_bounded() {
    let a = AgentProc::start("noread");
    let pid = a.child.id();
    let mut d = Daemon::connect(&a.path);
    // A hang (the agent no longer reading the link) becomes a failure, not a stall.
    d.stream
        .set_write_timeout(Some(TIMEOUT))
        .expect("set a write timeout");
    d.open(1);
    d.open(2);
    d.shell_pid(1);
    d.shell_pid(2);
    d.input(1, "sleep 120\n");
    d.pump(Duration::from_millis(300));
    let rss0 = rss_kib(pid);
    let mut peak = rss0;
    let line = format!("#{}\n", "x".repeat(63));
    let chunk = line.repeat(1024); // 64 KiB
    for round in 1..=16 {
        for _ in 0..32 {
            d.input(1, &chunk); // 2 MiB per round
            d.dispatch();
        }
        d.run(
            2,
            &format!("echo r{round}-$((6+6))"),
            &format!("r{round}-12"),
        );
        peak = peak.max(rss_kib(pid));
    }
    d.pump(Duration::from_millis(200));
    let pauses = d.pauses(1);
    println!("32 MiB to a program that never reads its terminal: claw-agent VmRSS {rss0} KiB before, peak {peak} KiB; {pauses} PAUSE");
    assert_eq!(pauses, 1, "the stuck session's input is PAUSEd once");
    assert!(
        !d.text(1, 0).contains("discard"),
        "nothing is written into the session"
    );
    assert!(
        peak < rss0 + 16 * 1024,
        "claw-agent grew from {rss0} KiB to {peak} KiB for 32 MiB of unread input"
    );
    // Closing the stuck session ends it; the other one still works.
    d.send(1, &Msg::Close(CloseReason::ClientDisconnect));
    d.run(2, "echo still-$((7+7))", "still-14");
}
