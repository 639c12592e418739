//! `clawtermd` as an operator runs it: signals, `--demo`, and shard pinning to the CPU affinity
//! mask (README "Running it for real", CLI.md). Real processes only.

mod common;
use clawterm_testkit as harness;

use common::*;
use harness::{bin, clear_clawterm_env, collect_lines_into, signal, Lines};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// A `clawtermd` started with exactly the given arguments (plus `--admin off --no-quic`), with
/// its stdout and stderr lines collected together.
struct Daemon {
    child: Child,
    lines: Lines,
}

impl Daemon {
    fn spawn(wrapper: &[&str], args: &[&str]) -> Daemon {
        let exe = bin("clawtermd");
        let mut cmd = match wrapper.split_first() {
            Some((prog, rest)) => {
                let mut c = Command::new(prog);
                c.args(rest).arg(exe);
                c
            }
            None => Command::new(exe),
        };
        cmd.args(args)
            .args(["--admin", "off", "--no-quic"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1");
        clear_clawterm_env(&mut cmd);
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn clawtermd (wrapped in {wrapper:?}): {e}"));
        let lines = Lines::default();
        collect_lines_into(child.stdout.take().unwrap(), &lines, |_| {});
        collect_lines_into(child.stderr.take().unwrap(), &lines, |_| {});
        Daemon { child, lines }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn log(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    /// Waits up to `t` for a line containing `what`; panics early on one containing `fail`.
    fn wait_line(&mut self, what: &str, fail: &str, t: Duration) -> String {
        let deadline = Instant::now() + t;
        loop {
            {
                let l = self.lines.lock().unwrap();
                if let Some(x) = l.iter().find(|x| x.contains(what)) {
                    return x.clone();
                }
                if let Some(x) = l.iter().find(|x| !fail.is_empty() && x.contains(fail)) {
                    panic!("clawtermd printed {x:?}; output:\n{}", l.join("\n"));
                }
            }
            if let Ok(Some(s)) = self.child.try_wait() {
                std::thread::sleep(ms(100)); // let the readers catch up
                panic!(
                    "clawtermd exited ({s}) before printing {what:?}; output:\n{}",
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "no line with {what:?} within {t:?}; output:\n{}",
                self.log()
            );
            std::thread::sleep(ms(10));
        }
    }

    fn signal_and_wait(&mut self, sig: libc::c_int, t: Duration) -> Option<ExitStatus> {
        signal(self.child.id(), sig);
        wait_timeout(&mut self.child, t)
    }

    /// The CPUs each `shard-N` thread may run on, by shard index.
    fn shard_cpus(&self) -> Vec<(usize, String)> {
        let mut v: Vec<(usize, String)> = self
            .thread_cpus()
            .into_iter()
            .filter_map(|(comm, cpus)| Some((comm.strip_prefix("shard-")?.parse().ok()?, cpus)))
            .collect();
        v.sort();
        v
    }

    /// Every thread's name and the CPUs it may run on (`Cpus_allowed_list`).
    fn thread_cpus(&self) -> Vec<(String, String)> {
        let mut v = Vec::new();
        let dir = format!("/proc/{}/task", self.pid());
        for e in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{dir}: {e}")) {
            let p = e.unwrap().path();
            let Ok(comm) = std::fs::read_to_string(p.join("comm")) else {
                continue; // the thread ended meanwhile
            };
            let Ok(status) = std::fs::read_to_string(p.join("status")) else {
                continue;
            };
            let cpus = status
                .lines()
                .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
                .unwrap_or_else(|| panic!("no Cpus_allowed_list in {}", p.display()))
                .trim()
                .to_string();
            v.push((comm.trim().to_string(), cpus));
        }
        v
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!("---- clawtermd output ----\n{}", self.log());
        }
    }
}

/// SIGINT (Ctrl-C) stops the server as cleanly as SIGTERM: exit 0, every connection closed.
#[test]
fn sigint_exits_cleanly_with_sessions_open() {
    for_each_config(|cfg| {
        let mut env = Env::start(cfg, &[]);
        let mut attached: Vec<Client> = (0..3).map(|_| env.session()).collect();
        for c in &mut attached {
            c.echo(b"open");
        }
        let mut suspended = env.session();
        suspended.echo(b"then suspended");
        suspended.send(SUSPEND, &[]);
        suspended.expect_closed();
        let status = env
            .server
            .signal_and_wait(libc::SIGINT, Duration::from_secs(5))
            .unwrap_or_else(|| panic!("clawtermd still running 5 s after SIGINT"));
        assert!(
            status.success(),
            "clawtermd exited with {status} after SIGINT"
        );
        assert!(
            env.server.log_contains("shutting down"),
            "no shutdown message: {:?}",
            env.server.log_lines()
        );
        for c in &mut attached {
            c.expect_closed_after_any(Duration::from_secs(2));
        }
    });
}

/// `clawtermd --demo` (README step 1): its scripted client connects, echoes, loses the
/// connection, resumes and gets exactly the missed frames, and says so; SIGTERM then stops it
/// with exit 0 and its temporary directory removed.
#[test]
fn demo_walkthrough_succeeds_then_sigterm_stops_it() {
    let mut d = Daemon::spawn(&[], &["--demo", "--port", "0"]);
    d.wait_line("listening on tcp 127.0.0.1:", "", Duration::from_secs(10));
    d.wait_line("dev token: ", "", Duration::from_secs(10));
    d.wait_line(
        "demo walkthrough: OK",
        "demo walkthrough failed",
        Duration::from_secs(20),
    );
    let out = d.log();
    for step in [
        "[1] CONNECT",
        "[3] connection dropped",
        "[4] RESUME",
        "[5] DISCONNECT",
    ] {
        assert!(out.contains(step), "no {step:?} in the demo output:\n{out}");
    }
    assert_eq!(
        out.matches("replayed: ").count(),
        3,
        "the 3 in-flight echoes replayed once each:\n{out}"
    );
    let dir = std::env::temp_dir().join(format!("clawterm-demo-{}", d.pid()));
    assert!(
        dir.exists(),
        "{} missing while the demo runs",
        dir.display()
    );
    let status = d
        .signal_and_wait(libc::SIGTERM, Duration::from_secs(5))
        .expect("clawtermd --demo still running 5 s after SIGTERM");
    assert!(status.success(), "exit status {status}");
    assert!(!dir.exists(), "{} left behind", dir.display());
}

/// The CPUs this test process may run on.
fn allowed_cpus() -> Vec<usize> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let list = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .unwrap()
        .trim()
        .to_string();
    let mut v = Vec::new();
    for part in list.split(',') {
        match part.split_once('-') {
            Some((a, b)) => v.extend(a.parse::<usize>().unwrap()..=b.parse().unwrap()),
            None => v.push(part.parse().unwrap()),
        }
    }
    v
}

fn shards_in_banner(line: &str) -> usize {
    let i = line
        .find(" shards")
        .unwrap_or_else(|| panic!("no shard count in {line:?}"));
    line[..i]
        .rsplit(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no shard count in {line:?}"))
}

fn plaintext_args(dir: &TempDir) -> Vec<String> {
    let sock = dir.0.join("sock");
    std::fs::create_dir_all(&sock).unwrap();
    let tokens = dir.0.join("tokens");
    std::fs::write(&tokens, format!("{TENANT} {}\n", hex(&TOKEN))).unwrap();
    vec![
        "--bind".into(),
        "127.0.0.1".into(),
        "--port".into(),
        "0".into(),
        "--insecure-plaintext".into(),
        "--tokens".into(),
        tokens.display().to_string(),
        "--socket-dir".into(),
        sock.display().to_string(),
    ]
}

/// One shard per CPU of the affinity mask, each pinned to its CPU: under `taskset -c 1` one
/// shard on CPU 1; `--shards N --cpus LIST` puts shard i on the i-th CPU of LIST (round-robin
/// when N is larger) and keeps the daemon's other threads on LIST.
#[test]
fn shards_follow_the_affinity_mask_and_cpus() {
    let cpus = allowed_cpus();
    if !(cpus.contains(&0) && cpus.contains(&1)) {
        eprintln!("SKIPPING: needs CPUs 0 and 1 in the affinity mask, have {cpus:?}");
        return;
    }
    let dir = TempDir::new("affinity");
    let base = plaintext_args(&dir);
    let base: Vec<&str> = base.iter().map(String::as_str).collect();

    // Under taskset -c 1, without --shards/--cpus: 1 shard, on CPU 1.
    let mut d = Daemon::spawn(&["taskset", "-c", "1"], &base);
    let banner = d.wait_line("listening on tcp", "", Duration::from_secs(10));
    assert_eq!(shards_in_banner(&banner), 1, "{banner}");
    assert_eq!(d.shard_cpus(), vec![(0, "1".to_string())], "{banner}");
    let mut c = Client::connect(
        banner
            .split("listening on tcp ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .and_then(|a| a.parse().ok())
            .expect("address in the banner"),
    );
    assert_eq!(
        c.try_connect_session(TENANT, AGENT, &TOKEN),
        Err(E_NO_AGENT),
        "the pinned shard serves"
    );
    assert!(d
        .signal_and_wait(libc::SIGTERM, Duration::from_secs(5))
        .is_some_and(|s| s.success()));

    // --cpus (a CPU set, like Linux cpulists): shard i on the i-th CPU of the set, round-robin
    // when there are more shards than CPUs; the daemon's other threads stay on the set too.
    for (shards, list, want, all) in [
        (1, "1", vec!["1"], "1"),
        (2, "0,1", vec!["0", "1"], "0-1"),
        (2, "1", vec!["1", "1"], "1"),
        (3, "0,1", vec!["0", "1", "0"], "0-1"),
    ] {
        let mut args = base.clone();
        let n = shards.to_string();
        args.extend(["--shards", &n, "--cpus", list]);
        let mut d = Daemon::spawn(&[], &args);
        let banner = d.wait_line("listening on tcp", "", Duration::from_secs(10));
        assert_eq!(shards_in_banner(&banner), shards, "{banner}");
        let want: Vec<(usize, String)> = want
            .iter()
            .enumerate()
            .map(|(i, c)| (i, c.to_string()))
            .collect();
        assert_eq!(d.shard_cpus(), want, "--shards {shards} --cpus {list}");
        for (comm, cpus) in d.thread_cpus() {
            // (The kernel's io_uring workers, `iou-*`, follow the cpuset, not this mask.)
            if !comm.starts_with("shard-") && !comm.starts_with("iou-") {
                assert_eq!(cpus, all, "thread {comm} with --cpus {list}");
            }
        }
        assert!(d
            .signal_and_wait(libc::SIGTERM, Duration::from_secs(5))
            .is_some_and(|s| s.success()));
    }
}
