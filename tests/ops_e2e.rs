//! Operations: `/metrics` scraped during a run and parsed with a real Prometheus text-format
//! parser (counters and gauges move as sessions come, resume — on the same or another shard —
//! and go), `/healthz` and `/readyz` (also while slow clients hold admin connections), the
//! daemon exiting non-zero when a shard dies, the epoll fallback when io_uring is refused by a
//! seccomp filter, and the configuration layers (command line > environment > TOML file), with
//! `--check-config` refusing bad values and naming where each came from.

mod common;
use clawterm_testkit as harness;

use common::*;
use harness::{
    bin, clear_clawterm_env, collect_lines, plaintext_clawtermd, stop, tcp_addr, word_after, Lines,
};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

fn http(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).expect("connect admin");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(s, "{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let status = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    http(addr, "GET", path)
}

/// The admin address from a log line `admin endpoint on http://ADDR`.
fn admin_in(lines: &[String]) -> Option<SocketAddr> {
    lines
        .iter()
        .find_map(|l| word_after(l, "admin endpoint on http://")?.parse().ok())
}

fn admin_addr(env: &Env) -> SocketAddr {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(a) = admin_in(&env.server.log_lines()) {
            return a;
        }
        assert!(
            Instant::now() < deadline,
            "no admin line in {:?}",
            env.server.log_lines()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Parses a scrape with `prometheus-parse` and returns the sum of the samples of `name` whose
/// labels include every pair in `labels`.
fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let lines = text.lines().map(|l| Ok(l.to_string()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("valid Prometheus text format");
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            prometheus_parse::Value::Histogram(ref h) => {
                h.iter().map(|b| b.count).fold(0.0, f64::max)
            }
            _ => 0.0,
        })
        .sum()
}

/// Whether the scrape has a sample named `name` at all.
fn has(text: &str, name: &str) -> bool {
    let lines = text.lines().map(|l| Ok(l.to_string()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("valid Prometheus text format");
    scrape.samples.iter().any(|s| s.metric == name)
}

fn wait_for(admin: SocketAddr, what: &str, f: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (code, body) = http_get(admin, "/metrics");
        assert_eq!(code, 200);
        if f(&body) {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "metrics never showed {what}:\n{body}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `clawterm_connections` per shard (2 shards).
fn conns(body: &str) -> [f64; 2] {
    [0, 1].map(|i| value(body, "clawterm_connections", &[("shard", ["0", "1"][i])]))
}

/// A suspended session to resume: id, resume token, the server SEQ to report, and the
/// payloads the server must replay (those after that SEQ).
struct Away {
    sid: u32,
    token: [u8; 16],
    last_seen: u32,
    replay: Vec<Vec<u8>>,
}

/// Resumes `away` on a new connection after finding out (from the per-shard connections
/// gauge) which of the 2 shards accepted that connection, and checks that the resume is
/// counted under the right label: `same_shard` when that shard owns the session (the low bit
/// of its id), `cross_shard` otherwise. `attached` are the sessions with a client connection
/// now: each connection lives on its session's shard (a new session is made by the shard that
/// accepted it, a resumed one's connection is handed to its owner), which tells the expected
/// gauge of each shard. Returns the attached client and the label that moved.
fn resume_counted(
    env: &Env,
    admin: SocketAddr,
    attached: &[u32],
    away: &Away,
) -> (Client, &'static str) {
    let mut expect = [0.0; 2];
    for sid in attached {
        expect[(sid & 1) as usize] += 1.0;
    }
    wait_for(admin, &format!("connections per shard {expect:?}"), |b| {
        conns(b) == expect
    });
    let mut c = env.client();
    let after = wait_for(admin, "the new connection", |b| {
        let a = conns(b);
        a == [expect[0] + 1.0, expect[1]] || a == [expect[0], expect[1] + 1.0]
    });
    let landed = if conns(&after)[0] == expect[0] { 1 } else { 0 };
    let owner = (away.sid & 1) as usize;
    let (label, other) = if landed == owner {
        ("same_shard", "cross_shard")
    } else {
        ("cross_shard", "same_shard")
    };
    let n = |body: &str, kind: &str| value(body, "clawterm_resumes_total", &[("kind", kind)]);
    let replay_before = value(&after, "clawterm_replay_bytes_total", &[]);
    c.resume(away.sid, away.last_seen, &away.token);
    for p in &away.replay {
        let f = c.recv_frame();
        assert_eq!((f.typ, f.flags), (DATA, F_REPLAY), "{f:?}");
        assert_eq!(&f.payload, p);
    }
    let replayed: usize = away.replay.iter().map(Vec::len).sum();
    let body = wait_for(admin, &format!("a {label} resume"), |b| {
        n(b, label) == n(&after, label) + 1.0
    });
    assert_eq!(
        n(&body, other),
        n(&after, other),
        "session {:#x} (shard {owner}) resumed on shard {landed}: {other} moved too",
        away.sid
    );
    assert_eq!(
        value(&body, "clawterm_replay_bytes_total", &[]),
        replay_before + replayed as f64,
        "replayed {replayed} payload bytes"
    );
    (c, label)
}

#[test]
fn metrics_move_as_sessions_come_and_go() {
    // 2 shards, so that resumes land on the owning shard or on the other one.
    for cfg in [CONFIGS[1], CONFIGS[3]] {
        let env = Env::start(cfg, &["--admin", "127.0.0.1:0"]);
        let admin = admin_addr(&env);
        assert_eq!(http_get(admin, "/healthz").0, 200);
        assert_eq!(http_get(admin, "/readyz").0, 200, "every shard serving");
        let before = http_get(admin, "/metrics").1;
        assert_eq!(value(&before, "clawterm_sessions", &[]), 0.0);
        assert_eq!(value(&before, "clawterm_connections", &[]), 0.0);
        assert_eq!(value(&before, "clawterm_ring_bytes", &[]), 0.0);
        assert_eq!(value(&before, "clawterm_shards_ready", &[]), 2.0);
        assert_eq!(
            value(
                &before,
                "clawterm_io_backend",
                &[(
                    "backend",
                    if cfg.io == "uring" {
                        "io_uring"
                    } else {
                        "epoll"
                    }
                )]
            ),
            1.0
        );

        // 6 sessions, each with one echo the client never acknowledges: 6 x 6 payload bytes
        // stay in the replay rings.
        let mut clients: Vec<(Client, u32, Vec<u8>)> = (0..6)
            .map(|i| {
                let mut c = env.session();
                let accepted_seq = c.last_seq;
                let p = format!("ping-{i}").into_bytes();
                c.echo(&p);
                (c, accepted_seq, p)
            })
            .collect();
        let body = wait_for(admin, "6 attached sessions on 6 connections", |b| {
            value(b, "clawterm_sessions", &[("state", "attached")]) == 6.0
                && value(b, "clawterm_connections", &[]) == 6.0
                && value(b, "clawterm_ring_bytes", &[]) == 36.0
        });
        assert!(value(&body, "clawterm_frames_total", &[("dir", "in")]) >= 12.0);
        assert!(value(&body, "clawterm_frames_total", &[("dir", "out")]) >= 12.0);
        // In: CONNECT (13 + 58) and DATA (13 + 6); out: ACCEPT (13 + payload) and DATA (13 + 6).
        assert!(value(&body, "clawterm_bytes_total", &[("dir", "in")]) >= 6.0 * 90.0);
        assert!(value(&body, "clawterm_bytes_total", &[("dir", "out")]) >= 6.0 * 45.0);
        assert!(value(&body, "clawterm_pod_links", &[]) >= 1.0);
        assert!(value(&body, "clawterm_handshake_seconds_count", &[]) >= 6.0);
        assert_eq!(value(&body, "clawterm_pods", &[]), 1.0);

        // Drop three abruptly: they become suspended, their connections go.
        let away: Vec<Away> = clients
            .drain(..3)
            .map(|(c, accepted_seq, p)| {
                let a = Away {
                    sid: c.sid,
                    token: c.resume_token,
                    last_seen: accepted_seq,
                    replay: vec![p],
                };
                c.drop_abruptly();
                a
            })
            .collect();
        wait_for(admin, "3 suspended, 3 connections", |b| {
            value(b, "clawterm_sessions", &[("state", "suspended")]) == 3.0
                && value(b, "clawterm_connections", &[]) == 3.0
        });
        // Resume them, reporting only ACCEPT as seen: each gets its echo replayed, and the
        // resume is counted under the label of where it landed.
        let mut labels = Vec::new();
        let mut back: Vec<(Client, u32, [u8; 16])> = Vec::new();
        let attached = |back: &[(Client, u32, [u8; 16])]| -> Vec<u32> {
            clients
                .iter()
                .map(|(c, _, _)| c.sid)
                .chain(back.iter().map(|(_, sid, _)| *sid))
                .collect()
        };
        for a in &away {
            let (c, label) = resume_counted(&env, admin, &attached(&back), a);
            labels.push(label);
            back.push((c, a.sid, a.token));
        }
        let body = http_get(admin, "/metrics").1;
        assert_eq!(value(&body, "clawterm_replay_bytes_total", &[]), 18.0);
        assert!(value(&body, "clawterm_resume_seconds_count", &[]) >= 3.0);
        // Until both labels have moved: drop a resumed client and resume it again, reporting
        // everything as seen (nothing to replay; its ring is trimmed). Each landing is a coin
        // toss.
        let mut trimmed = std::collections::HashSet::new();
        for round in 0.. {
            if labels.contains(&"same_shard") && labels.contains(&"cross_shard") {
                break;
            }
            assert!(
                round < 16,
                "16 resumes and still not both labels: {labels:?}"
            );
            let (c, sid, token) = back.remove(0);
            let a = Away {
                sid,
                token,
                last_seen: c.last_seq,
                replay: Vec::new(),
            };
            c.drop_abruptly();
            let (c, label) = resume_counted(&env, admin, &attached(&back), &a);
            labels.push(label);
            back.push((c, sid, token));
            trimmed.insert(sid);
        }
        let body = http_get(admin, "/metrics").1;
        assert_eq!(
            value(&body, "clawterm_resumes_total", &[]),
            labels.len() as f64
        );
        assert_eq!(
            value(&body, "clawterm_replay_bytes_total", &[]),
            18.0,
            "resumes reporting everything as seen replay nothing"
        );

        // A refused RESUME is counted under its code.
        let mut bad = env.client();
        assert_eq!(
            bad.try_resume(0x7777_0000, 0, &[1; 16]),
            Err(E_NO_SUCH_SESSION)
        );
        let body = wait_for(admin, "an error", |b| {
            value(b, "clawterm_errors_total", &[("code", "NO_SUCH_SESSION")]) >= 1.0
        });
        assert_eq!(
            value(&body, "clawterm_errors_total", &[("code", "AUTH_FAILED")]),
            0.0
        );
        // Sessions that end leave the gauges; acknowledged or not, their rings go with them.
        for (mut c, _, _) in clients {
            c.send(DISCONNECT, &[]);
            c.expect_closed();
        }
        // The resumed sessions stay; those resumed with everything reported as seen hold no
        // ring bytes any more, the others still hold their unacknowledged echo.
        let ring = 6.0 * (3 - trimmed.len()) as f64;
        let body = wait_for(admin, "3 sessions left", |b| {
            value(b, "clawterm_sessions", &[]) == 3.0
                && value(b, "clawterm_connections", &[]) == 3.0
                && value(b, "clawterm_ring_bytes", &[]) == ring
        });
        assert!(has(&body, "clawterm_unknown_frames_total"));
        assert_eq!(http_get(admin, "/nope").0, 404);
        let (code, body) = http(admin, "HEAD", "/readyz");
        assert_eq!((code, body.as_str()), (200, ""), "HEAD has no body");
        drop(back);
    }
}

/// A few clients that trickle their request a byte at a time must not delay the probes: the
/// admin endpoint serves each connection on its own and gives a request head 1 s in total.
#[test]
fn slow_admin_clients_do_not_delay_healthz() {
    let env = Env::start(CONFIGS[0], &["--admin", "127.0.0.1:0"]);
    let admin = admin_addr(&env);
    let (tx, rx) = mpsc::channel();
    let slow: Vec<_> = (0..4)
        .map(|_| {
            let tx = tx.clone();
            std::thread::spawn(move || {
                let mut s = TcpStream::connect(admin).unwrap();
                let start = Instant::now();
                // Half a request head, a byte every 100 ms, then nothing: the old
                // one-request-at-a-time endpoint sat on each such client for 2 s after its
                // last byte, and the probes queued behind them.
                for b in b"GET /m" {
                    s.write_all(&[*b]).unwrap();
                    std::thread::sleep(Duration::from_millis(100));
                }
                s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                let mut resp = String::new();
                let _ = s.read_to_string(&mut resp);
                let _ = tx.send((start.elapsed(), resp));
            })
        })
        .collect();
    drop(tx);
    std::thread::sleep(Duration::from_millis(300));
    // With the slow clients connected and trickling, probes are answered right away (the
    // 5 s read timeout in `http` would fail the test if they waited for the slow clients).
    for _ in 0..5 {
        let t = Instant::now();
        assert_eq!(http_get(admin, "/healthz"), (200, "ok\n".into()));
        assert_eq!(http_get(admin, "/readyz").0, 200);
        assert!(
            t.elapsed() < Duration::from_secs(4),
            "probes took {:?} with slow clients connected",
            t.elapsed()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The slow clients were cut off with 408 after the 1 s head deadline, not served forever.
    for (elapsed, what) in rx.iter() {
        assert!(
            what.starts_with("HTTP/1.1 408 "),
            "slow client got {what:?}"
        );
        assert!(
            elapsed < Duration::from_secs(4),
            "cut off after {elapsed:?}"
        );
    }
    for t in slow {
        t.join().unwrap();
    }
}

// ---------------------------------------------------------------------------------------------
// A daemon started by hand: extra environment, and optionally a seccomp filter.

struct Daemon {
    child: Child,
    lines: Lines,
    addr: SocketAddr,
    admin: SocketAddr,
}

impl Daemon {
    fn start(dir: &Path, extra: &[&str], env: &[(&str, &str)], deny_io_uring: bool) -> Daemon {
        let sock = dir.join("sock");
        let tokens = dir.join("tokens");
        std::fs::write(&tokens, format!("{TENANT} {}\n", hex(&TOKEN))).unwrap();
        let mut cmd = plaintext_clawtermd(&tokens, &sock);
        cmd.args(["--admin", "127.0.0.1:0", "--no-quic"])
            .args(extra);
        cmd.env("RUST_LOG", "info").envs(env.iter().copied());
        if deny_io_uring {
            seccomp::deny_io_uring_setup(&mut cmd);
        }
        let mut child = cmd.spawn().expect("spawn clawtermd");
        let lines = collect_lines(child.stderr.take().unwrap(), |_| {});
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let l = lines.lock().unwrap().clone();
            let addr = l.iter().find_map(|l| tcp_addr(l));
            if let (Some(addr), Some(admin)) = (addr, admin_in(&l)) {
                return Daemon {
                    child,
                    lines,
                    addr,
                    admin,
                };
            }
            if let Ok(Some(s)) = child.try_wait() {
                panic!("clawtermd exited early ({s}): {l:#?}");
            }
            assert!(Instant::now() < deadline, "clawtermd did not start: {l:#?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        stop(&mut self.child);
        if std::thread::panicking() {
            eprintln!("---- clawtermd stderr ----\n{}", self.log().join("\n"));
        }
    }
}

mod seccomp {
    //! A classic-BPF seccomp filter, installed in the child between fork and exec, that makes
    //! `io_uring_setup` fail with ENOSYS, as on a kernel without io_uring (container runtimes'
    //! default profiles answer EPERM; either way the daemon must fall back to epoll).

    use std::os::unix::process::CommandExt;

    #[cfg(target_arch = "x86_64")]
    const AUDIT_ARCH: u32 = 0xC000_003E; // AUDIT_ARCH_X86_64
    #[cfg(target_arch = "aarch64")]
    const AUDIT_ARCH: u32 = 0xC000_00B7; // AUDIT_ARCH_AARCH64
    /// `io_uring_setup` has the same number on every architecture (the unified table).
    const NR_IO_URING_SETUP: u32 = 425;

    /// BPF_LD | BPF_W | BPF_ABS (0x00 | 0x00 | 0x20).
    const BPF_LD_W_ABS: u16 = 0x20;
    /// BPF_JMP | BPF_JEQ | BPF_K (0x05 | 0x10 | 0x00).
    const BPF_JMP_JEQ_K: u16 = 0x15;
    /// BPF_RET | BPF_K (0x06 | 0x00).
    const BPF_RET_K: u16 = 0x06;
    /// Offsets in `struct seccomp_data`.
    const OFF_NR: u32 = 0;
    const OFF_ARCH: u32 = 4;

    fn op(code: u16, jt: u8, jf: u8, k: u32) -> libc::sock_filter {
        libc::sock_filter { code, jt, jf, k }
    }

    pub fn deny_io_uring_setup(cmd: &mut std::process::Command) {
        let prog = [
            op(BPF_LD_W_ABS, 0, 0, OFF_ARCH),
            // Another ABI than the one this test was built for: leave it alone.
            op(BPF_JMP_JEQ_K, 1, 0, AUDIT_ARCH),
            op(BPF_RET_K, 0, 0, libc::SECCOMP_RET_ALLOW),
            op(BPF_LD_W_ABS, 0, 0, OFF_NR),
            op(BPF_JMP_JEQ_K, 0, 1, NR_IO_URING_SETUP),
            op(
                BPF_RET_K,
                0,
                0,
                libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32,
            ),
            op(BPF_RET_K, 0, 0, libc::SECCOMP_RET_ALLOW),
        ];
        // SAFETY: the closure runs in the forked child before exec and only makes two
        // system calls on memory it owns (the filter array moved into it); it allocates
        // nothing and takes no locks.
        unsafe {
            cmd.pre_exec(move || {
                let fprog = libc::sock_fprog {
                    len: prog.len() as u16,
                    filter: prog.as_ptr() as *mut libc::sock_filter,
                };
                if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::syscall(
                    libc::SYS_seccomp,
                    libc::SECCOMP_SET_MODE_FILTER,
                    0,
                    &fprog as *const libc::sock_fprog,
                ) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
}

/// `--io auto` under a seccomp filter refusing io_uring_setup: the daemon says why it falls
/// back, serves on epoll, and exports the backend.
#[test]
fn io_auto_falls_back_to_epoll_when_seccomp_refuses_io_uring() {
    let dir = TempDir::new("seccomp");
    std::fs::create_dir_all(dir.0.join("sock")).unwrap();
    let _agent = AgentProc::start(&dir.0.join("sock"), TENANT, AGENT);
    let d = Daemon::start(&dir.0, &["--io", "auto", "--shards", "2"], &[], true);
    let log = d.log();
    let fallback = log
        .iter()
        .find(|l| l.contains("falling back to the epoll backend"))
        .unwrap_or_else(|| panic!("no fallback line in {log:#?}"));
    assert!(
        fallback.contains("io_uring_setup failed") && fallback.contains("os error 38"),
        "the fallback line does not give the filter's ENOSYS as the reason: {fallback}"
    );
    assert!(
        log.iter()
            .any(|l| l.contains("listening on tcp") && l.contains("epoll I/O")),
        "{log:#?}"
    );
    let mut c = Client::connect(d.addr);
    c.connect_session(TENANT, AGENT, &TOKEN);
    c.echo(b"served on epoll");
    let body = http_get(d.admin, "/metrics").1;
    assert_eq!(
        value(&body, "clawterm_io_backend", &[("backend", "epoll")]),
        1.0
    );
    assert_eq!(
        value(&body, "clawterm_io_backend", &[("backend", "io_uring")]),
        0.0
    );
    assert_eq!(http_get(d.admin, "/healthz").0, 200);
}

/// A shard that panics takes its sessions with it: the daemon must not linger half-alive
/// (answering `/healthz`), but exit non-zero with an error saying so, so that the supervisor
/// restarts it. The panic is injected by the debug-build-only `CLAWTERMD_TEST_PANIC_ON` hook
/// (see `src/bin/clawtermd/main.rs`) on a real event of the shard's: refusing a bad token.
#[test]
fn daemon_exits_non_zero_when_a_shard_panics() {
    for shards in ["1", "2"] {
        let dir = TempDir::new("panic");
        std::fs::create_dir_all(dir.0.join("sock")).unwrap();
        let _agent = AgentProc::start(&dir.0.join("sock"), TENANT, AGENT);
        let mut d = Daemon::start(
            &dir.0,
            &["--io", "epoll", "--shards", shards],
            &[("CLAWTERMD_TEST_PANIC_ON", "CONNECT refused: bad token")],
            false,
        );
        let mut ok = Client::connect(d.addr);
        ok.connect_session(TENANT, AGENT, &TOKEN);
        ok.echo(b"before");
        assert_eq!(http_get(d.admin, "/healthz").0, 200);

        let mut c = Client::connect(d.addr);
        c.send_connect(TENANT, AGENT, &[0x11; 32]);
        let status = wait_timeout(&mut d.child, Duration::from_secs(10))
            .unwrap_or_else(|| panic!("{shards} shard(s): still running after a shard panicked"));
        assert!(
            !status.success(),
            "exited with {status} after a shard panic"
        );
        let log = d.log().join("\n");
        assert!(log.contains("injected fault"), "{log}");
        assert!(
            log.contains("shards stopped unexpectedly")
                && log.contains("exiting with an error so that the supervisor restarts"),
            "no clear error line: {log}"
        );
        assert!(log.contains("panicked"), "the panic is not reported: {log}");
    }
}

// ---------------------------------------------------------------------------------------------
// Configuration: TOML file, CLAWTERM_* variables, command line.

/// `clawtermd --config FILE --check-config ARGS` with `env` (and no other CLAWTERM_*):
/// (accepted, stdout + stderr).
fn check_config_env(args: &[&str], toml: &str, env: &[(&str, &str)]) -> (bool, String) {
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "clawterm-cc-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("clawtermd.toml");
    std::fs::write(&f, toml).unwrap();
    let mut cmd = Command::new(bin("clawtermd"));
    cmd.arg("--config").arg(&f).arg("--check-config").args(args);
    clear_clawterm_env(&mut cmd);
    cmd.envs(env.iter().copied());
    let out = cmd.output().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr),
    )
}

fn check_config(args: &[&str], toml: &str) -> (bool, String) {
    check_config_env(args, toml, &[])
}

/// Enough to pass `--check-config`, and none of the keys the cases below set.
const BASE: &str =
    "insecure_no_auth = true\ninsecure_plaintext = true\nsocket_dir = \"/tmp/clawterm-cc-sock\"\n";

#[test]
fn check_config_names_the_bad_key() {
    let ok = format!("{BASE}ring_bytes = 300000\nkeepalive = 10\noverflow = \"pause\"\ndemo = false\nno_quic = true\nmax_send_payload = 16384\nack_wait = 0.2\n");
    let (good, out) = check_config(&[], &ok);
    assert!(good, "{out}");
    assert!(out.contains("configuration OK"), "{out}");
    // Each case sets one key to a bad value (BASE does not set it: no duplicate key), and the
    // message names the file, the key and what is wrong with the value.
    for (line, key, why) in [
        ("bogus = 1\n", "`bogus`", "unknown key"),
        (
            "ring_bytes = 10\n",
            "`ring_bytes`",
            "--ring-bytes (10) must be at least --max-payload",
        ),
        ("port = \"abc\"\n", "`port`", "invalid value 'abc'"),
        (
            "overflow = \"sometimes\"\n",
            "`overflow`",
            "invalid value 'sometimes'",
        ),
        (
            "max_payload = 70000\n",
            "`max_payload`",
            "from 1024 to 65535",
        ),
        ("admin = \"nowhere\"\n", "`admin`", "ADDR:PORT"),
        (
            "max_send_payload = 100\n",
            "`max_send_payload`",
            "from 512 to 65535",
        ),
        ("ack_wait = 0\n", "`ack_wait`", "positive number of seconds"),
        (
            "keepalive = -1\n",
            "`keepalive`",
            "positive number of seconds",
        ),
        (
            "idle_timeout = 0\n",
            "`idle_timeout`",
            "positive number of seconds",
        ),
        ("demo = \"maybe\"\n", "`demo`", "invalid value 'maybe'"),
        (
            "shards = [1, 2]\n",
            "`shards`",
            "must be a string, number or boolean",
        ),
        ("config = \"x.toml\"\n", "`config`", "unknown key"),
    ] {
        let (good, out) = check_config(&[], &format!("{BASE}{line}"));
        assert!(!good, "{line} was accepted: {out}");
        assert!(
            out.contains(key) && out.contains("config file") && out.contains(why),
            "{line}: message does not name {key} and say {why:?}: {out}"
        );
        assert!(!out.contains("duplicate"), "{line}: {out}");
    }
    let no_auth = BASE.replace("insecure_no_auth = true\n", "");
    let (good, out) = check_config(&[], &format!("{no_auth}tokens = \"/nonexistent/tokens\"\n"));
    assert!(!good, "{out}");
    assert!(
        out.contains("`tokens`") && out.contains("/nonexistent/tokens"),
        "{out}"
    );
}

#[test]
fn command_line_beats_environment_beats_file() {
    // A bad value in the file is not used when the command line sets the key...
    let (good, out) = check_config(
        &["--ring-bytes", "400000"],
        &format!("{BASE}ring_bytes = 10\n"),
    );
    assert!(good, "the command line did not win over the file: {out}");
    let (good, out) = check_config(&["--port", "7301"], &format!("{BASE}port = \"abc\"\n"));
    assert!(good && out.contains(":7301,"), "{out}");
    // ...nor when the environment sets it.
    let (good, out) = check_config_env(
        &[],
        &format!("{BASE}port = \"abc\"\n"),
        &[("CLAWTERM_PORT", "7300")],
    );
    assert!(good, "the environment did not win over the file: {out}");
    assert!(out.contains("tcp 0.0.0.0:7300,"), "{out}");
    let (good, out) = check_config_env(
        &[],
        &format!("{BASE}port = 7302\n"),
        &[("CLAWTERM_PORT", "7303")],
    );
    assert!(good && out.contains(":7303,"), "{out}");
    // A bad value in the environment is not used when the command line sets the key.
    let (good, out) = check_config_env(&["--port", "7304"], BASE, &[("CLAWTERM_PORT", "abc")]);
    assert!(
        good && out.contains(":7304,"),
        "the command line did not win over the environment: {out}"
    );
    // The file applies when nothing else sets the key.
    let (good, out) = check_config(&[], &format!("{BASE}port = 7305\n"));
    assert!(good && out.contains(":7305,"), "{out}");
}

#[test]
fn a_bad_environment_variable_is_named() {
    for (var, val, why) in [
        ("CLAWTERM_PORT", "abc", "invalid value 'abc' for '--port"),
        ("CLAWTERM_KEEPALIVE", "-1", "positive number of seconds"),
        (
            "CLAWTERM_OVERFLOW",
            "sometimes",
            "invalid value 'sometimes'",
        ),
        ("CLAWTERM_NO_QUIC", "maybe", "invalid value 'maybe'"),
        ("CLAWTERM_MAX_PAYLOAD", "70000", "from 1024 to 65535"),
    ] {
        let (good, out) = check_config_env(&[], BASE, &[(var, val)]);
        assert!(!good, "{var}={val} was accepted: {out}");
        assert!(
            out.contains(&format!("environment variable {var}")) && out.contains(why),
            "{var}={val}: message does not name the variable and say {why:?}: {out}"
        );
    }
    // File and environment both set the key: the error names the one whose value was used.
    let (good, out) = check_config_env(
        &[],
        &format!("{BASE}keepalive = 10\n"),
        &[("CLAWTERM_KEEPALIVE", "-1")],
    );
    assert!(!good, "{out}");
    assert!(
        out.contains("environment variable CLAWTERM_KEEPALIVE"),
        "{out}"
    );
    assert!(
        !out.contains("key `keepalive`"),
        "blames the file for the environment's value: {out}"
    );
    let (good, out) = check_config_env(
        &[],
        &format!("{BASE}keepalive = -1\n"),
        &[("CLAWTERM_PORT", "7300")],
    );
    assert!(!good, "{out}");
    assert!(
        out.contains("config file") && out.contains("key `keepalive`"),
        "{out}"
    );
    assert!(!out.contains("CLAWTERM_KEEPALIVE"), "{out}");
    // Two options in conflict, one from each source: both are named.
    let (good, out) = check_config_env(
        &[],
        &format!("{BASE}max_payload = 65535\n"),
        &[("CLAWTERM_RING_BYTES", "2000")],
    );
    assert!(!good, "{out}");
    assert!(
        out.contains("environment variable CLAWTERM_RING_BYTES")
            && out.contains("key `max_payload`"),
        "{out}"
    );
}

#[test]
fn switches_take_boolean_words_in_the_environment() {
    // No TLS certificate: refused unless plaintext is allowed.
    let no_tls = "insecure_no_auth = true\nsocket_dir = \"/tmp/clawterm-cc-sock\"\n";
    let (good, out) = check_config(&[], no_tls);
    assert!(!good && out.contains("no TLS certificate"), "{out}");
    for yes in ["1", "true", "yes", "TRUE", "Yes", "on"] {
        let (good, out) = check_config_env(&[], no_tls, &[("CLAWTERM_INSECURE_PLAINTEXT", yes)]);
        assert!(good, "CLAWTERM_INSECURE_PLAINTEXT={yes}: {out}");
    }
    for no in ["0", "false", "no", "off"] {
        let (good, out) = check_config_env(&[], no_tls, &[("CLAWTERM_INSECURE_PLAINTEXT", no)]);
        assert!(
            !good && out.contains("no TLS certificate"),
            "CLAWTERM_INSECURE_PLAINTEXT={no}: {out}"
        );
    }
    // The environment's "no" beats the file's true.
    let (good, out) = check_config_env(&[], BASE, &[("CLAWTERM_INSECURE_PLAINTEXT", "no")]);
    assert!(!good && out.contains("no TLS certificate"), "{out}");
}

#[test]
fn demo_can_be_set_in_the_file_and_the_environment() {
    // --demo needs neither tokens nor a certificate (it brings its own).
    let bare = "socket_dir = \"/tmp/clawterm-cc-sock\"\n";
    let (good, out) = check_config(&[], bare);
    assert!(!good && out.contains("no TLS certificate"), "{out}");
    let (good, out) = check_config(&[], &format!("{bare}demo = true\n"));
    assert!(good, "demo = true in the file: {out}");
    let (good, out) = check_config_env(&[], bare, &[("CLAWTERM_DEMO", "1")]);
    assert!(good, "CLAWTERM_DEMO=1: {out}");
    let (good, out) = check_config_env(
        &[],
        &format!("{bare}demo = true\n"),
        &[("CLAWTERM_DEMO", "0")],
    );
    assert!(!good, "CLAWTERM_DEMO=0 did not win over the file: {out}");
}
