//! Live upgrade under load (docs/STATE.md): 2,000 RELIABLE echo sessions driven by `loadgen`
//! with traffic both ways and 100 suspended sessions with output pending, while `clawtermd` is
//! upgraded ten times in a row. Every echo arrives exactly once and in order (loadgen checks
//! each one's tag and counts losses), no session sees an error or loses its connection (a
//! plaintext connection moves with its session; loadgen does not reconnect, so any break would
//! be a failure), and the suspended sessions resume at the tenth process with exactly their
//! pending output. Real processes: clawtermd, claw-agent echo, loadgen.
//!
//! Lives in the loadgen package so that `cargo test --workspace` builds the loadgen binary
//! (`CARGO_BIN_EXE_loadgen`); clawtermd and claw-agent come from the same target directory.

use clawterm_client::{Event, Session};
use clawterm_testkit as harness;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const TENANT: u32 = 7;
const AGENT: u32 = 1;
const SESSIONS: usize = 2000;
const SUSPENDED: usize = 100;
const UPGRADES: usize = 10;

struct Daemon {
    child: Child,
    lines: harness::Lines,
    addr: std::net::SocketAddr,
}

impl Daemon {
    fn start(sock: &Path, state: &Path, upgrade: bool) -> Daemon {
        let mut cmd = harness::clawtermd();
        cmd.args(["--bind", "127.0.0.1", "--port", "0", "--shards", "2"])
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
            .arg(state)
            .env("RUST_LOG", "info");
        if upgrade {
            cmd.arg("--upgrade");
        }
        let (child, lines, line) = harness::start_server(&mut cmd, "clawtermd");
        Daemon {
            child,
            lines,
            addr: harness::tcp_addr(&line).expect("listen address"),
        }
    }

    fn tail(&self) -> String {
        let l = self.lines.lock().unwrap();
        l[l.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        harness::stop(&mut self.child);
    }
}

#[test]
fn ten_live_upgrades_under_echo_load_lose_and_repeat_nothing() {
    harness::raise_nofile();
    let dir = harness::TempDir::with_sock("upgrade-load");
    let state = dir.0.join("state");
    let _agent = harness::start_agent(&dir.sock(), TENANT, AGENT, &["echo"]);
    let mut srv = Daemon::start(&dir.sock(), &state, false);
    let addr = srv.addr;

    // Suspended sessions whose output the client never received: each sends a line and
    // detaches at once; the echo lands in its replay ring.
    let mut suspended = Vec::new();
    for i in 0..SUSPENDED {
        let mut s = Session::connect(&addr.to_string(), TENANT, AGENT, [0xAB; 32]).unwrap();
        s.send(format!("pending-{i};").as_bytes()).unwrap();
        suspended.push((s.detach(), i));
    }

    let json = dir.0.join("loadgen.json");
    let mut lg = Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args(["echo", "--target", &addr.to_string()])
        .args(["--sessions", &SESSIONS.to_string()])
        .args(["--duration", "30", "--warmup", "0"])
        .args([
            "--tenant",
            &TENANT.to_string(),
            "--agent",
            &AGENT.to_string(),
        ])
        .arg("--json")
        .arg(&json)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn loadgen");
    let (tx, rx) = std::sync::mpsc::channel();
    let lines = harness::collect_lines(lg.stderr.take().unwrap(), move |l| {
        if l.contains("sessions up") {
            let _ = tx.send(());
        }
    });
    rx.recv_timeout(Duration::from_secs(90))
        .unwrap_or_else(|_| {
            panic!(
                "loadgen never opened its sessions: {:?}",
                lines.lock().unwrap()
            )
        });
    std::thread::sleep(Duration::from_secs(2)); // echoes flowing

    for k in 0..UPGRADES {
        let next = Daemon::start(&dir.sock(), &state, true);
        assert_eq!(next.addr, addr, "the same listening socket");
        let deadline = Instant::now() + Duration::from_secs(20);
        while matches!(srv.child.try_wait(), Ok(None)) {
            assert!(
                Instant::now() < deadline,
                "upgrade {k}: the old clawtermd did not exit:\n{}",
                srv.tail()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let took = next
            .lines
            .lock()
            .unwrap()
            .iter()
            .find(|l| l.contains("upgrade: took over"))
            .cloned()
            .unwrap_or_else(|| panic!("upgrade {k}: no hand-over:\n{}", next.tail()));
        println!("upgrade {k}: {took}");
        // Every session moved (loadgen's warm-up session may be there too).
        let moved: usize = harness::word_after(&took, "sessions=")
            .and_then(|w| w.parse().ok())
            .unwrap_or(0);
        assert!(moved >= SESSIONS + SUSPENDED, "{took}");
        srv = next;
        std::thread::sleep(Duration::from_millis(1500));
    }

    let status = harness::wait_timeout(&mut lg, Duration::from_secs(120)).expect("loadgen ends");
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&json).expect("loadgen's JSON")).unwrap();
    println!(
        "loadgen: ok={} counts={} latency={}",
        v["ok"], v["counts"], v["latency_us"]
    );
    assert!(
        status.success() && v["ok"] == true,
        "loadgen saw problems: {} failures {}\n{:?}",
        v["problems"],
        v["failures"],
        lines.lock().unwrap()
    );
    for k in ["lost_in_window", "mismatched_echoes", "unsolicited_data"] {
        assert_eq!(
            v["counts"][k].as_u64().unwrap_or(0),
            0,
            "{k}: {}",
            v["counts"]
        );
    }
    assert_eq!(
        v["counts"]["alive_at_end"].as_u64(),
        Some(SESSIONS as u64),
        "{v}"
    );
    assert_eq!(v["counts"]["received"], v["counts"]["sent"], "{v}");

    for (creds, i) in suspended {
        let mut s = Session::resume(&creds).unwrap();
        let want = format!("pending-{i};");
        let mut got = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        while got.len() < want.len() {
            assert!(Instant::now() < deadline, "session {i}: got {got:?}");
            match s.recv(Duration::from_millis(100)).unwrap() {
                Some(Event::Data(d)) => got.extend_from_slice(&d),
                Some(Event::Gap) => panic!("session {i}: GAP"),
                _ => {}
            }
        }
        assert_eq!(
            got,
            want.as_bytes(),
            "session {i}: exactly its pending output"
        );
    }
}
