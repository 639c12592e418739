//! Operations: `/metrics` scraped during a run and parsed with a real Prometheus text-format
//! parser (counters move as sessions come and go), `/healthz`, `/readyz`, and
//! `--check-config` refusing bad configuration with a message naming the key.

mod common;

use common::*;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).expect("connect admin");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
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

fn admin_addr(env: &Env) -> SocketAddr {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        for l in env.server.log_lines() {
            if let Some(i) = l.find("admin endpoint on http://") {
                let rest = &l[i + "admin endpoint on http://".len()..];
                return rest.split_whitespace().next().unwrap().parse().unwrap();
            }
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

#[test]
fn metrics_move_as_sessions_come_and_go() {
    for cfg in [CONFIGS[1], CONFIGS[3]] {
        let env = Env::start(cfg, &["--admin", "127.0.0.1:0"]);
        let admin = admin_addr(&env);
        assert_eq!(http_get(admin, "/healthz").0, 200);
        assert_eq!(http_get(admin, "/readyz").0, 200, "every shard serving");
        let before = http_get(admin, "/metrics").1;
        assert_eq!(value(&before, "clawterm_sessions", &[]), 0.0);
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

        let mut clients: Vec<Client> = (0..6).map(|_| env.session()).collect();
        for c in clients.iter_mut() {
            c.echo(b"ping");
        }
        let body = wait_for(admin, "6 attached sessions", |b| {
            value(b, "clawterm_sessions", &[("state", "attached")]) == 6.0
        });
        assert!(value(&body, "clawterm_frames_total", &[("dir", "in")]) >= 12.0);
        assert!(value(&body, "clawterm_frames_total", &[("dir", "out")]) >= 12.0);
        assert!(value(&body, "clawterm_bytes_total", &[("dir", "in")]) > 0.0);
        assert!(value(&body, "clawterm_pod_links", &[]) >= 1.0);
        assert!(value(&body, "clawterm_handshake_seconds_count", &[]) >= 6.0);
        assert_eq!(value(&body, "clawterm_pods", &[]), 1.0);

        // Drop three abruptly: they become suspended.
        let dropped: Vec<(u32, [u8; 16], u32)> = clients
            .drain(..3)
            .map(|c| {
                let k = (c.sid, c.resume_token, c.last_seq);
                c.drop_abruptly();
                k
            })
            .collect();
        wait_for(admin, "3 suspended", |b| {
            value(b, "clawterm_sessions", &[("state", "suspended")]) == 3.0
        });
        // Resume them: resumes counted (same or cross shard), replay bytes not negative.
        for (sid, tok, last) in &dropped {
            let mut c = env.client();
            c.resume(*sid, *last, tok);
        }
        let body = wait_for(admin, "3 resumes", |b| {
            value(b, "clawterm_resumes_total", &[]) == 3.0
        });
        assert!(value(&body, "clawterm_resume_seconds_count", &[]) >= 3.0);
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
        // Sessions that end leave the gauges.
        for mut c in clients {
            c.send(DISCONNECT, &[]);
            c.expect_closed();
        }
        wait_for(admin, "3 sessions left", |b| {
            value(b, "clawterm_sessions", &[]) == 3.0
        });
        assert_eq!(http_get(admin, "/nope").0, 404);
    }
}

fn check_config(args: &[&str], toml: &str) -> (bool, String) {
    let dir = std::env::temp_dir().join(format!(
        "clawterm-cc-{}-{}",
        std::process::id(),
        toml.len() + args.len()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("clawtermd.toml");
    std::fs::write(&f, toml).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_clawtermd"));
    cmd.arg("--config").arg(&f).arg("--check-config").args(args);
    for (k, _) in std::env::vars() {
        if k.starts_with("CLAWTERM_") {
            cmd.env_remove(k);
        }
    }
    let out = cmd.output().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[test]
fn check_config_names_the_bad_key() {
    let ok = "insecure_no_auth = true\ninsecure_plaintext = true\nsocket_dir = \"/tmp/clawterm-cc-sock\"\nring_bytes = 300000\nkeepalive = 10\noverflow = \"pause\"\n";
    let (good, out) = check_config(&[], ok);
    assert!(good, "{out}");
    assert!(out.contains("configuration OK"), "{out}");
    for (toml, key) in [
        ("bogus = 1\n", "`bogus`"),
        ("ring_bytes = 10\n", "`ring_bytes`"),
        ("port = \"abc\"\n", "`port`"),
        ("overflow = \"sometimes\"\n", "`overflow`"),
        ("max_payload = 70000\n", "`max_payload`"),
        ("admin = \"nowhere\"\n", "`admin`"),
        ("keepalive = -1\n", "`keepalive`"),
        (
            "tokens = \"/nonexistent/tokens\"\ninsecure_no_auth = false\n",
            "`tokens`",
        ),
    ] {
        let text = format!(
            "{}{toml}",
            ok.replace(
                "insecure_no_auth = true\n",
                if toml.contains("tokens") {
                    ""
                } else {
                    "insecure_no_auth = true\n"
                }
            )
        );
        let (good, out) = check_config(&[], &text);
        assert!(!good, "{toml} was accepted: {out}");
        assert!(
            out.contains(key),
            "{toml}: message does not name {key}: {out}"
        );
    }
    // The command line wins over the file.
    let (good, out) = check_config(&["--ring-bytes", "400000"], ok);
    assert!(good, "{out}");
}
