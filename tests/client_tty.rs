//! The `clawterm` CLI under a real terminal (tmux with a private socket and a 50,000-line
//! history): a shell session and its detach; an outage in the middle of output (the status
//! line appears; after the network comes back every line is on the screen exactly once); `~.`
//! while the server is unreachable; a window resize reaching the agent's terminal; and a second
//! device taking the session over. Agents are `claw-agent shell` (`/bin/sh`). Markers the
//! tests look for are computed by the shell, so the terminal's echo of a command never matches.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use clawterm_testkit::client as client_support;
use client_support::*;

// ---------------------------------------------------------------------------------------------
// tmux

struct Tmux {
    socket: String,
    config: PathBuf,
}

impl Tmux {
    fn new() -> Tmux {
        static N: AtomicU32 = AtomicU32::new(0);
        let socket = format!(
            "test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        );
        let config = std::env::temp_dir().join(format!("ct-tmux-{socket}.conf"));
        std::fs::write(&config, "set -g history-limit 50000\n").expect("write tmux config");
        Tmux { socket, config }
    }

    fn run(&self, args: &[&str]) -> String {
        let out = Command::new("tmux")
            .args(["-L", &self.socket, "-f"])
            .arg(&self.config)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run tmux");
        assert!(
            out.status.success(),
            "tmux {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The visible pane of tmux session `target`.
    fn capture_of(&self, target: &str) -> String {
        self.run(&["capture-pane", "-p", "-t", target])
    }

    /// The pane of `target` with its whole history.
    fn history_of(&self, target: &str) -> String {
        self.run(&["capture-pane", "-p", "-S", "-", "-E", "-", "-t", target])
    }

    fn keys(&self, target: &str, keys: &[&str]) {
        let mut args = vec!["send-keys", "-t", target];
        args.extend_from_slice(keys);
        self.run(&args);
    }

    /// Waits until the visible pane of `target` satisfies `f`.
    fn wait_on(
        &self,
        target: &str,
        what: &str,
        within: Duration,
        f: impl Fn(&str) -> bool,
    ) -> String {
        let deadline = Instant::now() + within;
        loop {
            let s = self.capture_of(target);
            if f(&s) {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "pane {target} never showed {what}; pane:\n{s}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn wait_for(&self, what: &str, within: Duration, f: impl Fn(&str) -> bool) -> String {
        self.wait_on("ct", what, within, f)
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["-L", &self.socket, "kill-server"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_file(&self.config);
    }
}

fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

fn require_tmux() {
    let ok = Command::new("tmux")
        .arg("-V")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        ok,
        "tmux is required for these tests (apt-get install tmux)"
    );
}

/// Runs `clawterm ARGS` (state in `state`) in a fresh tmux session `target` (100x30); the pane
/// stays open after it exits, showing `EXIT=<status>`.
fn start_clawterm(t: &Tmux, target: &str, state: &Path, args: &str) {
    let cmd = format!(
        "env CLAWTERM_STATE_DIR={} {} {args}; echo EXIT=$?; sleep 60",
        sh_quote(&state.display().to_string()),
        sh_quote(env!("CARGO_BIN_EXE_clawterm")),
    );
    t.run(&[
        "new-session",
        "-d",
        "-s",
        target,
        "-x",
        "100",
        "-y",
        "30",
        &cmd,
    ]);
}

/// `clawterm connect ENDPOINT ... --name tty --log LOG` in tmux session `ct`.
fn start_client(t: &Tmux, endpoint: &str, agent: u32, state: &Path, log: &Path) {
    start_clawterm(
        t,
        "ct",
        state,
        &format!(
            "connect {endpoint} --tenant {TENANT} --agent {agent} --token {} --plaintext --name tty --log {}",
            hex(&TOKEN),
            sh_quote(&log.display().to_string()),
        ),
    );
}

/// Runs the `clawterm` CLI to completion (not in a terminal).
fn clawterm(state: &Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_clawterm"))
        .args(args)
        .env("CLAWTERM_STATE_DIR", state)
        .stdin(Stdio::null())
        .output()
        .expect("run clawterm")
}

/// The line of `clawterm list` for session `name`.
fn list_line(state: &Path, name: &str) -> String {
    let out = clawterm(state, &["list"]);
    assert!(out.status.success(), "clawterm list: {out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| l.starts_with(&format!("{name} ")))
        .unwrap_or_else(|| {
            panic!(
                "{name} not in `clawterm list`:\n{}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
        .to_string()
}

/// A shell session: a command's output shows in the pane; `~.` detaches (exit 0) and the
/// session stays saved, listed as detached.
#[test]
fn tty_shell_session_and_detach() {
    require_tmux();
    let env = Env::start(&["shell", "--shell", "/bin/sh"]);
    let state = env.dir.0.join("state");
    let t = Tmux::new();
    let log = env.dir.0.join("shell.log");
    start_client(&t, &env.endpoint(), AGENT, &state, &log);
    t.wait_for("the banner", Duration::from_secs(10), |s| {
        s.contains("session tty")
    });
    assert!(
        list_line(&state, "tty").contains("attached here"),
        "{}",
        list_line(&state, "tty")
    );
    t.keys("ct", &["echo out-$((6*7))", "Enter"]);
    t.wait_for("the command's output", Duration::from_secs(10), |s| {
        s.contains("out-42")
    });
    // Detach on purpose: Enter ~. ; the client exits 0 and the session stays saved.
    t.keys("ct", &["Enter", "~."]);
    let s = t.wait_for("the detach", Duration::from_secs(10), |s| {
        s.contains("EXIT=")
    });
    assert!(s.contains("EXIT=0") && s.contains("detached"), "{s}");
    assert!(state.join("sessions/tty.json").exists());
    let l = list_line(&state, "tty");
    assert!(l.contains(" detached "), "{l}");
}

/// Every `MKnnnnnZ` marker (5 digits) in `line`.
fn markers(line: &str) -> Vec<&str> {
    let b = line.as_bytes();
    (0..b.len().saturating_sub(7))
        .filter(|&i| {
            b[i..i + 2] == *b"MK"
                && b[i + 2..i + 7].iter().all(u8::is_ascii_digit)
                && b[i + 7] == b'Z'
        })
        .map(|i| &line[i..i + 8])
        .collect()
}

/// An outage while `claw-agent shell` prints: the status line shows during the cut; after the
/// network comes back every line is on the screen exactly once and in order (the pane's whole
/// history, and `--log`), the status line is gone, and `~X` ends the session.
#[test]
fn tty_cut_while_printing_shows_every_line_once() {
    require_tmux();
    let env = Env::start(&["shell", "--shell", "/bin/sh"]);
    let state = env.dir.0.join("state");
    let proxy = Proxy::start(env.addr);
    let t = Tmux::new();
    let log = env.dir.0.join("seq.log");
    start_client(&t, &proxy.endpoint(), AGENT, &state, &log);
    t.wait_for("the banner", Duration::from_secs(10), |s| {
        s.contains("session tty")
    });
    t.wait_for("the prompt", Duration::from_secs(10), |s| {
        s.lines().any(|l| matches!(l.trim_end(), "$" | "#"))
    });
    // MK00001Z .. MK00300Z, about 3 s; the echo of the command line holds no such marker.
    t.keys(
        "ct",
        &[
            "for i in $(seq 1 300); do printf 'MK%05dZ\\n' $i; sleep 0.01; done; echo END-$((2*21))",
            "Enter",
        ],
    );
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !read_log().contains("MK00020Z") {
        assert!(
            Instant::now() < deadline,
            "output never started: {:?}",
            read_log()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    proxy.cut();
    let s = t.wait_for("the status line", Duration::from_secs(10), |s| {
        s.contains("connection lost")
    });
    assert!(
        s.contains("retrying in") || s.contains("reconnecting"),
        "{s}"
    );
    std::thread::sleep(Duration::from_millis(1000));
    let s = t.capture_of("ct");
    assert!(
        s.contains("connection lost"),
        "status line gone during the outage:\n{s}"
    );
    assert!(
        !read_log().contains("END-42"),
        "output finished during the outage (no outage?)"
    );
    proxy.restore();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !read_log().contains("END-42") {
        assert!(
            Instant::now() < deadline,
            "output never completed after restore; log: {:?}",
            read_log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let s = t.wait_for("the status line to go away", Duration::from_secs(5), |s| {
        !s.contains("connection lost") && s.contains("END-42")
    });
    assert!(s.contains("END-42"), "{s}");
    // Exactly once, in order: on the screen (the pane with its history) ...
    let pane = t.history_of("ct");
    let on_screen: Vec<&str> = pane.lines().flat_map(markers).collect();
    let want: Vec<String> = (1..=300).map(|i| format!("MK{i:05}Z")).collect();
    assert_eq!(
        on_screen, want,
        "every line exactly once on the screen, in order; pane:\n{pane}"
    );
    assert!(
        !pane.contains("connection lost"),
        "the status line was left in the pane:\n{pane}"
    );
    // ... and in the log of received bytes.
    let logged_text = read_log();
    let logged: Vec<&str> = logged_text.lines().flat_map(markers).collect();
    assert_eq!(logged, want, "every line exactly once in --log");
    // End the session on purpose: Enter ~X.
    t.keys("ct", &["Enter", "~X"]);
    let s = t.wait_for("the end", Duration::from_secs(10), |s| s.contains("EXIT="));
    assert!(s.contains("EXIT=0"), "{s}");
    assert!(
        !state.join("sessions/tty.json").exists(),
        "ended session still saved"
    );
}

/// The status line makes room for itself: the bottom row it is drawn on usually holds the
/// cursor's line (here a prompt with a half-typed command), which must stay visible during the
/// outage and after it, and typing then goes on where it was.
#[test]
fn tty_status_line_keeps_the_line_under_it() {
    require_tmux();
    let env = Env::start(&["shell", "--shell", "/bin/sh"]);
    let state = env.dir.0.join("state");
    let proxy = Proxy::start(env.addr);
    let t = Tmux::new();
    let log = env.dir.0.join("keep.log");
    start_client(&t, &proxy.endpoint(), AGENT, &state, &log);
    t.wait_for("the prompt", Duration::from_secs(10), |s| {
        s.lines().any(|l| matches!(l.trim_end(), "$" | "#"))
    });
    // Fill the screen so the prompt sits on the bottom row, then type without Enter.
    t.keys("ct", &["seq 1 60", "Enter"]);
    t.wait_for("the numbers", Duration::from_secs(10), |s| {
        s.contains("\n60\n")
    });
    t.keys("ct", &["echo KEEP-ME-$((70+7))"]);
    let s = t.wait_for("the typed command", Duration::from_secs(10), |s| {
        s.lines()
            .last()
            .is_some_and(|l| l.contains("echo KEEP-ME-"))
    });
    assert_eq!(s.lines().count(), 30, "the pane is full: {s}");
    proxy.cut();
    let s = t.wait_for("the status line", Duration::from_secs(10), |s| {
        s.contains("connection lost")
    });
    let lines: Vec<&str> = s.lines().collect();
    assert!(
        lines.last().is_some_and(|l| l.contains("connection lost")),
        "the status line is on the bottom row:\n{s}"
    );
    assert!(
        lines.iter().any(|l| l.contains("echo KEEP-ME-")),
        "the line the status line was drawn over is gone:\n{s}"
    );
    proxy.restore();
    let s = t.wait_for("the status line to go away", Duration::from_secs(30), |s| {
        !s.contains("connection lost")
    });
    assert!(s.contains("echo KEEP-ME-"), "{s}");
    // Typing continues on that line: Enter runs the half-typed command.
    t.keys("ct", &["Enter"]);
    t.wait_for("the command's output", Duration::from_secs(10), |s| {
        s.contains("KEEP-ME-77")
    });
    t.keys("ct", &["Enter", "~X"]);
    let s = t.wait_for("the end", Duration::from_secs(10), |s| s.contains("EXIT="));
    assert!(s.contains("EXIT=0"), "{s}");
}

/// `~.` while the server is unreachable detaches at once, even in the middle of a reconnect
/// attempt that would take 10 s (the proxy accepts connections and never answers).
#[test]
fn tty_detach_while_unreachable_is_prompt() {
    require_tmux();
    let env = Env::start(&["shell", "--shell", "/bin/sh"]);
    let state = env.dir.0.join("state");
    let proxy = Proxy::start(env.addr);
    let t = Tmux::new();
    let log = env.dir.0.join("bh.log");
    start_client(&t, &proxy.endpoint(), AGENT, &state, &log);
    t.wait_for("the banner", Duration::from_secs(10), |s| {
        s.contains("session tty")
    });
    let before = proxy.accepted.load(Ordering::SeqCst);
    proxy.black_hole();
    // A reconnect attempt is in progress: connected, waiting for an answer that never comes.
    t.wait_for("a reconnect attempt", Duration::from_secs(10), |s| {
        s.contains("reconnecting now")
    });
    let deadline = Instant::now() + Duration::from_secs(5);
    while proxy.accepted.load(Ordering::SeqCst) == before {
        assert!(Instant::now() < deadline, "no attempt reached the proxy");
        std::thread::sleep(Duration::from_millis(10));
    }
    let t0 = Instant::now();
    t.keys("ct", &["Enter", "~."]);
    // A blocking attempt would hold the keys for the 10 s handshake timeout.
    let s = t.wait_for("the detach", Duration::from_secs(3), |s| {
        s.contains("EXIT=")
    });
    println!(
        "~. during a hanging reconnect attempt: exit seen after {:?}",
        t0.elapsed()
    );
    assert!(s.contains("EXIT=0") && s.contains("detached"), "{s}");
    let l = list_line(&state, "tty");
    assert!(l.contains(" detached "), "{l}");
    // The session is still there: resume it (the network is back).
    proxy.restore();
    let t2 = Tmux::new();
    start_clawterm(&t2, "ct", &state, "resume tty");
    t2.wait_for("the banner", Duration::from_secs(10), |s| {
        s.contains("session tty")
    });
    t2.keys("ct", &["echo back-$((5*5))", "Enter"]);
    t2.wait_for("the resumed shell", Duration::from_secs(10), |s| {
        s.contains("back-25")
    });
}

/// RESIZE from the client reaches the agent: `stty size` in the shell shows the tmux window's
/// size, and the new size after the window is resized.
#[test]
fn tty_window_resize_reaches_the_agent() {
    require_tmux();
    let env = Env::start(&["shell", "--shell", "/bin/sh"]);
    let state = env.dir.0.join("state");
    let t = Tmux::new();
    let log = env.dir.0.join("rs.log");
    start_client(&t, &env.endpoint(), AGENT, &state, &log);
    t.wait_for("the banner", Duration::from_secs(10), |s| {
        s.contains("session tty")
    });
    t.keys("ct", &["echo S1-$(stty size | tr ' ' x)-E", "Enter"]);
    t.wait_for("the first size", Duration::from_secs(10), |s| {
        s.contains("S1-30x100-E")
    });
    t.run(&["resize-window", "-t", "ct", "-x", "120", "-y", "40"]);
    std::thread::sleep(Duration::from_millis(300));
    t.keys("ct", &["echo S2-$(stty size | tr ' ' x)-E", "Enter"]);
    // The output line, not the echo of the command.
    let s = t.wait_for("the new size", Duration::from_secs(10), |s| {
        s.lines()
            .any(|l| l.starts_with("S2-") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
    });
    assert!(s.contains("S2-40x120-E"), "{s}");
}

/// Another device: one `clawterm connect`ed in tmux, its session exported and imported into a
/// second state directory, and `clawterm resume` from a second process: the first exits with
/// status 6 saying it was taken over; the second has the session; `clawterm list` on each
/// device says so.
#[test]
fn tty_second_device_takes_over() {
    require_tmux();
    let env = Env::start(&["shell", "--shell", "/bin/sh"]);
    let (state_a, state_b) = (env.dir.0.join("device-a"), env.dir.0.join("device-b"));
    let t = Tmux::new();
    let log = env.dir.0.join("a.log");
    start_client(&t, &env.endpoint(), AGENT, &state_a, &log);
    t.wait_for("the banner", Duration::from_secs(10), |s| {
        s.contains("session tty")
    });
    t.keys("ct", &["X=from-a; echo first-$((3*3))", "Enter"]);
    t.wait_for("the first device's shell", Duration::from_secs(10), |s| {
        s.contains("first-9")
    });

    let out = clawterm(&state_a, &["export", "tty"]);
    assert!(out.status.success(), "export: {out:?}");
    let blob = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(blob.starts_with("ct1:"), "{blob}");
    let out = clawterm(&state_b, &["import", &blob]);
    assert!(out.status.success(), "import: {out:?}");
    assert!(
        list_line(&state_b, "tty").contains("imported"),
        "{}",
        list_line(&state_b, "tty")
    );

    // The second device resumes: the first is told and exits 6.
    start_clawterm(&t, "ct2", &state_b, "resume tty");
    let s = t.wait_for("the first device's exit", Duration::from_secs(10), |s| {
        s.contains("EXIT=")
    });
    assert!(s.contains("EXIT=6"), "{s}");
    assert!(s.contains("taken over"), "{s}");
    t.wait_on("ct2", "the banner", Duration::from_secs(10), |s| {
        s.contains("session tty")
    });
    // Same shell: its variable is there.
    t.keys("ct2", &["echo second-$X-$((4*4))", "Enter"]);
    t.wait_on(
        "ct2",
        "the shell on the second device",
        Duration::from_secs(10),
        |s| s.contains("second-from-a-16"),
    );
    let a = list_line(&state_a, "tty");
    assert!(a.contains("taken over"), "device A: {a}");
    let b = list_line(&state_b, "tty");
    assert!(b.contains("attached here"), "device B: {b}");
    t.keys("ct2", &["Enter", "~."]);
    let s = t.wait_on("ct2", "the detach", Duration::from_secs(10), |s| {
        s.contains("EXIT=")
    });
    assert!(s.contains("EXIT=0"), "{s}");
    let b = list_line(&state_b, "tty");
    assert!(b.contains(" detached "), "device B: {b}");
}
