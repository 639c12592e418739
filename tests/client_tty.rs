//! The `clawterm` CLI under a real terminal (tmux with a private socket): a shell session,
//! then an outage in the middle of output: the status line appears, and after the network comes
//! back every line arrives exactly once (checked through `--log`) and the status line goes away.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

mod client_support;
use client_support::*;

// ---------------------------------------------------------------------------------------------
// tmux

struct Tmux {
    socket: String,
}

impl Tmux {
    fn new() -> Tmux {
        static N: AtomicU32 = AtomicU32::new(0);
        Tmux {
            socket: format!(
                "test-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::SeqCst)
            ),
        }
    }

    fn run(&self, args: &[&str]) -> String {
        let out = Command::new("tmux")
            .args(["-L", &self.socket, "-f", "/dev/null"])
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

    fn capture(&self) -> String {
        self.run(&["capture-pane", "-p", "-t", "ct"])
    }

    /// Waits until the pane satisfies `f`.
    fn wait_for(&self, what: &str, within: Duration, f: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + within;
        loop {
            let s = self.capture();
            if f(&s) {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "pane never showed {what}; pane:\n{s}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
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
    }
}

fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

fn tmux_available() -> bool {
    Command::new("tmux")
        .arg("-V")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Starts `clawterm connect` in a fresh tmux session (100x30) named `ct`; the pane stays open
/// after it exits, showing `EXIT=<status>`.
fn start_client(t: &Tmux, endpoint: &str, agent: u32, state: &Path, log: &Path) {
    let cmd = format!(
        "env CLAWTERM_STATE_DIR={} {} connect {endpoint} --tenant {TENANT} --agent {agent} --token {} --plaintext --name tty --log {}; echo EXIT=$?; sleep 60",
        sh_quote(&state.display().to_string()),
        sh_quote(env!("CARGO_BIN_EXE_clawterm")),
        hex(&TOKEN),
        sh_quote(&log.display().to_string()),
    );
    t.run(&[
        "new-session",
        "-d",
        "-s",
        "ct",
        "-x",
        "100",
        "-y",
        "30",
        &cmd,
    ]);
}

#[test]
fn tty_session_survives_outage() {
    if !tmux_available() {
        panic!("tmux is required for this test (apt-get install tmux)");
    }
    // Agent 1: a shell in a PTY. Agent 2: prints L1..L300 slowly once it reads a line.
    let mut env = Env::start(&["shell", "--shell", "/bin/sh"]);
    let sock = env.dir.0.join("sock");
    env.agents.push(start_agent(
        &sock,
        2,
        &[
            "exec",
            "--",
            "sh",
            "-c",
            "read x; for i in $(seq 1 300); do echo L$i; sleep 0.01; done; sleep 60",
        ],
    ));
    let state = env.dir.0.join("state");

    // 1. Interactive shell: a command's output shows in the pane.
    {
        let t = Tmux::new();
        let log = env.dir.0.join("shell.log");
        start_client(&t, &env.endpoint(), AGENT, &state, &log);
        t.wait_for("the banner", Duration::from_secs(10), |s| {
            s.contains("session tty")
        });
        t.run(&["send-keys", "-t", "ct", "echo out-$((6*7))", "Enter"]);
        t.wait_for("the command's output", Duration::from_secs(10), |s| {
            s.contains("out-42")
        });
        // Detach on purpose: Enter ~. ; the client exits 0 and the session stays saved.
        t.run(&["send-keys", "-t", "ct", "Enter", "~."]);
        let s = t.wait_for("the detach", Duration::from_secs(10), |s| {
            s.contains("EXIT=")
        });
        assert!(s.contains("EXIT=0") && s.contains("detached"), "{s}");
        assert!(state.join("sessions/tty.json").exists());
        let _ = std::fs::remove_file(state.join("sessions/tty.json"));
    }

    // 2. An outage in the middle of output.
    let proxy = Proxy::start(env.addr);
    let t = Tmux::new();
    let log = env.dir.0.join("seq.log");
    start_client(&t, &proxy.endpoint(), 2, &state, &log);
    t.wait_for("the banner", Duration::from_secs(10), |s| {
        s.contains("session tty")
    });
    t.run(&["send-keys", "-t", "ct", "C-j"]);
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !read_log().contains("L20\n") {
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
    let during = read_log();
    std::thread::sleep(Duration::from_millis(1000));
    assert!(
        !read_log().contains("L300\n"),
        "output finished during the outage (no outage?)"
    );
    proxy.restore();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !read_log().contains("L300\n") {
        assert!(
            Instant::now() < deadline,
            "output never completed after restore; log: {:?}",
            read_log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    let want: String = (1..=300).map(|i| format!("L{i}\n")).collect();
    let got = read_log();
    assert!(got.len() > during.len(), "nothing replayed");
    assert_eq!(got, want, "every line exactly once, in order");
    t.wait_for("the status line to go away", Duration::from_secs(5), |s| {
        !s.contains("connection lost")
    });
    // End the session on purpose: Enter ~X (sent as C-j so the agent's `read` is not involved).
    t.run(&["send-keys", "-t", "ct", "C-j", "~X"]);
    let s = t.wait_for("the end", Duration::from_secs(10), |s| s.contains("EXIT="));
    assert!(s.contains("EXIT=0"), "{s}");
    assert!(
        !state.join("sessions/tty.json").exists(),
        "ended session still saved"
    );
}
