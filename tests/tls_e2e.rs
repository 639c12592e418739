//! TLS 1.3 on `clawtermd`'s TCP port, end to end with real processes: a non-rustls TLS stack
//! (Python's `ssl`, i.e. OpenSSL) completes the handshake and speaks ClawTerm; TLS 1.2 and
//! plaintext clients are refused cleanly; the client library over TLS (CA file, pin) survives
//! cuts with exact replay; cross-shard resume over TLS; certificate reload on SIGHUP.

use clawterm_testkit as harness;
use clawterm_testkit::tls as tls_support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use clawterm_client::core::ClientCore;
use clawterm_client::{ClientError, Event, Session, Transport};
use harness::session::{collect_until, fast_opts, receive_through_cuts, wait_disconnected};
use tls_support::*;

const ECHO: u32 = 1;

/// The Python client: TLS via the `ssl` module, ClawTerm frames built by hand (CRC-16/UMTS
/// implemented here). Prints one JSON object.
const PY_CLIENT: &str = r#"
import json, os, socket, ssl, struct, sys
host, port, cafile, mode, tenant, agent, token = sys.argv[1:8]
out = {}

def crc16(data):
    crc = 0
    for b in data:
        crc ^= b << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x8005) & 0xFFFF if crc & 0x8000 else (crc << 1) & 0xFFFF
    return crc

def frame(sid, seq, typ, payload):
    h = struct.pack(">BIIBBH", 0x7E, sid, seq, typ, 0, len(payload)) + payload
    return h + struct.pack(">H", crc16(h))

out["crc_check"] = "%04x" % crc16(b"123456789")
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.load_verify_locations(cafile=cafile)
if mode == "tls13":
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
else:
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
raw = socket.create_connection((host, int(port)), timeout=5)
try:
    s = ctx.wrap_socket(raw, server_hostname=host)
except (ssl.SSLError, OSError) as e:
    out["handshake"] = "failed"
    out["error_type"] = type(e).__name__
    out["error"] = str(e)
    print(json.dumps(out))
    sys.exit(0)
out["handshake"] = "ok"
out["version"] = s.version()
out["cipher"] = s.cipher()[0]

def read_exact(n):
    b = b""
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c:
            raise EOFError("closed")
        b += c
    return b

def read_frame():
    h = read_exact(13)
    flag, sid, seq, typ, flags, ln = struct.unpack(">BIIBBH", h)
    p = read_exact(ln)
    (crc,) = struct.unpack(">H", read_exact(2))
    if crc != crc16(h + p):
        raise ValueError("bad CRC")
    return {"flag": flag, "sid": sid, "seq": seq, "type": typ, "payload": p}

token = bytes.fromhex(token)
connect = bytes([1, 1]) + struct.pack(">II", int(tenant), int(agent)) + token + os.urandom(16)
s.sendall(frame(0, 1, 0x01, connect))
f = read_frame()
out["first_type"] = f["type"]
out["session_id"] = f["sid"]
out["accept_len"] = len(f["payload"])
if f["type"] == 0x02:
    msg = b"hello from python ssl"
    s.sendall(frame(f["sid"], 2, 0x10, msg))
    got = b""
    while len(got) < len(msg):
        g = read_frame()
        if g["type"] == 0x10:
            got += g["payload"]
    out["echo"] = got.decode()
    s.sendall(frame(f["sid"], 3, 0x40, b""))
s.close()
print(json.dumps(out))
"#;

fn python(env: &TlsEnv, mode: &str) -> serde_json::Value {
    let script = env.dir.0.join("client.py");
    std::fs::write(&script, PY_CLIENT).unwrap();
    let mut child = Command::new("python3")
        .arg(&script)
        .args([
            "127.0.0.1",
            &env.addr.port().to_string(),
            env.cert.to_str().unwrap(),
            mode,
            &TENANT.to_string(),
            &ECHO.to_string(),
            &hex(&TOKEN),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3");
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the python client hung");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "python failed: {stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

fn echo_roundtrip(s: &mut Session, msg: &[u8]) {
    s.send(msg).unwrap();
    let (d, _) = collect_until(s, Duration::from_secs(5), |d| d.len() >= msg.len());
    assert_eq!(d, msg);
}

fn pin_of(hexfp: &str) -> [u8; 32] {
    clawterm_client::transport::parse_pin(hexfp).unwrap()
}

// ---------------------------------------------------------------------------------------------

#[test]
fn python_ssl_tls13_client_speaks_clawterm() {
    let env = TlsEnv::start(&[(ECHO, &["echo"])], 2, "info");
    let v = python(&env, "tls13");
    assert_eq!(v["crc_check"], "fee8", "the script's CRC-16/UMTS: {v}");
    assert_eq!(v["handshake"], "ok", "{v}");
    assert_eq!(v["version"], "TLSv1.3", "{v}");
    assert_eq!(v["first_type"], 2, "ACCEPT expected: {v}");
    assert_ne!(v["session_id"], 0, "{v}");
    assert_eq!(v["accept_len"], 22, "{v}");
    assert_eq!(v["echo"], "hello from python ssl", "{v}");
}

#[test]
fn tls12_only_client_is_refused_and_server_stays_healthy() {
    let mut env = TlsEnv::start(&[(ECHO, &["echo"])], 2, "info");
    let v = python(&env, "tls12");
    assert_eq!(
        v["handshake"], "failed",
        "a TLS 1.2 client got through: {v}"
    );
    assert_eq!(v["error_type"], "SSLError", "{v}");
    let err = v["error"].as_str().unwrap().to_ascii_lowercase();
    assert!(
        err.contains("version") || err.contains("alert"),
        "unexpected failure: {err}"
    );
    assert!(env.server_alive());
    // A TLS 1.3 client works right after.
    let v = python(&env, "tls13");
    assert_eq!(v["echo"], "hello from python ssl", "{v}");
}

#[test]
fn plaintext_client_on_the_tls_port_is_closed_cleanly() {
    let mut env = TlsEnv::start(&[(ECHO, &["echo"])], 2, "info");
    for _ in 0..3 {
        let mut core = ClientCore::new(TENANT, ECHO, TOKEN);
        core.start_connect([7; 16], 0);
        let connect = core.take_output();
        assert_eq!(connect.len(), 58 + 15);
        let mut s = TcpStream::connect(env.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(&connect).unwrap();
        let t = Instant::now();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        let end = loop {
            match s.read(&mut buf) {
                Ok(0) => break "eof",
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break "reset",
                Err(e) => panic!("no clean close within 5 s: {e} (after {:?})", t.elapsed()),
            }
        };
        assert!(t.elapsed() < Duration::from_secs(5), "{end} too late");
        // At most a TLS alert record (type 21), never a ClawTerm frame.
        assert!(
            got.is_empty() || got[0] == 0x15,
            "unexpected answer {:02x?}",
            &got[..got.len().min(16)]
        );
    }
    assert!(env.server_alive());
    let v = python(&env, "tls13");
    assert_eq!(v["echo"], "hello from python ssl", "{v}");
}

#[test]
fn client_library_over_tls_ca_then_pin() {
    const N: usize = 300;
    let script = format!(
        "read x; i=1; while [ $i -le {N} ]; do echo L$i; i=$((i+1)); sleep 0.005; done; sleep 60"
    );
    let env = TlsEnv::start(
        &[(ECHO, &["echo"]), (2, &["exec", "--", "sh", "-c", &script])],
        2,
        "info",
    );
    let proxy = Proxy::start(env.addr);
    let ca = Transport::tls_ca(&env.cert);

    // --ca: echo, a cut, input typed while down delivered once after the reconnect.
    let mut s = Session::connect_with(
        &proxy.endpoint(),
        TENANT,
        ECHO,
        TOKEN,
        fast_opts(ca.clone()),
    )
    .unwrap();
    let (v, c) = s.tls_info().expect("TLS in use");
    assert_eq!(v, "TLSv1_3");
    assert!(c.starts_with("TLS13_"), "{c}");
    echo_roundtrip(&mut s, b"<before>");
    proxy.cut();
    wait_disconnected(&mut s);
    s.send(b"<typed>").unwrap();
    std::thread::sleep(Duration::from_millis(150));
    proxy.restore();
    let (d, evs) = collect_until(&mut s, Duration::from_secs(10), |d| contains(d, b"<typed>"));
    let (more, _) = collect_until(&mut s, Duration::from_secs(2), {
        let t = Instant::now();
        move |_| t.elapsed() > Duration::from_millis(400)
    });
    let all = [d, more].concat();
    assert_eq!(
        count(&all, b"<typed>"),
        1,
        "{:?}",
        String::from_utf8_lossy(&all)
    );
    assert_eq!(count(&all, b"<before>"), 0, "replayed twice");
    assert!(
        evs.iter().any(|e| matches!(e, Event::Reconnected { .. })),
        "{evs:?}"
    );
    assert!(s.tls_info().is_some(), "the reconnect is TLS too");
    // Credentials carry the transport: resuming them elsewhere uses TLS with the same CA.
    let creds = s.credentials("dev");
    assert!(creds.endpoint.starts_with("tls://"), "{}", creds.endpoint);
    assert!(creds.to_json().contains("\"transport\": \"tls\""));
    let creds = clawterm_client::Credentials::import(&creds.export()).unwrap();
    let mut b = Session::resume(&creds).unwrap();
    assert!(b.tls_info().is_some());
    echo_roundtrip(&mut b, b"<resumed>");
    drop(b);
    drop(s);

    // Output while the connection is repeatedly cut: every byte exactly once, in order.
    let mut s =
        Session::connect_with(&proxy.endpoint(), TENANT, 2, TOKEN, fast_opts(ca.clone())).unwrap();
    s.send(b"go\n").unwrap();
    let want: Vec<u8> = (1..=N)
        .flat_map(|i| format!("L{i}\n").into_bytes())
        .collect();
    let (data, cuts, reconnects) = receive_through_cuts(&mut s, &proxy, want.len(), 4);
    assert_eq!(
        String::from_utf8_lossy(&data),
        String::from_utf8_lossy(&want)
    );
    assert!(cuts >= 2, "output finished before enough cuts ({cuts})");
    assert!(reconnects >= 1);
    drop(s);

    // --pin: the right pin works (no CA needed), a wrong one fails clearly.
    let mut p = Session::connect_with(
        &env.endpoint(),
        TENANT,
        ECHO,
        TOKEN,
        fast_opts(Transport::tls_pin(pin_of(&env.fingerprint))),
    )
    .unwrap();
    echo_roundtrip(&mut p, b"<pinned>");
    let mut wrong = pin_of(&env.fingerprint);
    wrong[0] ^= 1;
    let e = Session::connect_with(
        &env.endpoint(),
        TENANT,
        ECHO,
        TOKEN,
        fast_opts(Transport::tls_pin(wrong)),
    )
    .unwrap_err();
    assert!(matches!(e, ClientError::Tls { .. }), "{e:?}");
    let msg = e.to_string();
    assert!(msg.contains("does not match the pin"), "{msg}");
    assert!(
        msg.contains(&env.fingerprint),
        "says the real SHA-256: {msg}"
    );
    assert_eq!(e.exit_code(), 7);
    // The system roots do not know a self-signed certificate: the message says what to do.
    let e = Session::connect_with(
        &env.endpoint(),
        TENANT,
        ECHO,
        TOKEN,
        fast_opts(Transport::tls_system()),
    )
    .unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("certificate not trusted"), "{msg}");
    assert!(
        msg.contains("--ca FILE") && msg.contains("--pin SHA256"),
        "{msg}"
    );
    // Plaintext against the TLS port: refused, with the hint.
    let e = Session::connect_with(
        &env.endpoint(),
        TENANT,
        ECHO,
        TOKEN,
        fast_opts(Transport::Plaintext),
    )
    .unwrap_err();
    assert!(
        matches!(e, ClientError::Tls { .. } | ClientError::Unreachable { .. }),
        "{e:?}"
    );
    assert!(e.to_string().contains("without --plaintext"), "{e}");
    // Still fine after all that.
    echo_roundtrip(&mut p, b"<still>");
}

#[test]
fn cli_over_tls_saves_and_resumes_the_transport() {
    let env = TlsEnv::start(&[(ECHO, &["echo"])], 2, "info");
    let state = TempDir::new("state");
    let cli = |args: &[&str]| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_clawterm"));
        c.args(args)
            .env("CLAWTERM_STATE_DIR", &state.0)
            .env_remove("CLAWTERM_TOKEN");
        c
    };
    let run = |mut c: Command, input: Option<&str>| {
        let mut child = c
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        if let Some(i) = input {
            stdin.write_all(i.as_bytes()).unwrap();
        }
        (child, stdin)
    };
    let wait = |mut child: std::process::Child, within: Duration| {
        let deadline = Instant::now() + within;
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                harness::signal(child.id(), libc::SIGTERM);
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let out = child.wait_with_output().unwrap();
        (out.status, String::from_utf8_lossy(&out.stderr).to_string())
    };
    let ep = env.endpoint();
    let tok = hex(&TOKEN);
    let base = [
        "connect",
        ep.as_str(),
        "--tenant",
        "7",
        "--agent",
        "1",
        "--token",
        tok.as_str(),
    ];

    // Without trust for the self-signed certificate: exit 7 and what to do.
    let (child, stdin) = run(cli(&base), None);
    drop(stdin);
    let (st, err) = wait(child, Duration::from_secs(10));
    assert_eq!(st.code(), Some(7), "{err}");
    assert!(err.contains("certificate not trusted"), "{err}");
    assert!(
        err.contains("--ca FILE") && err.contains("--pin SHA256"),
        "{err}"
    );
    // --plaintext against TLS: exit 3 with a hint.
    let mut a = base.to_vec();
    a.push("--plaintext");
    let (child, stdin) = run(cli(&a), None);
    drop(stdin);
    let (st, err) = wait(child, Duration::from_secs(10));
    assert!(matches!(st.code(), Some(7) | Some(3)), "{err}");
    assert!(err.contains("without --plaintext"), "{err}");

    // With --ca: connects over TLS; the saved credentials remember it.
    let log = state.0.join("out.log");
    let mut a = base.to_vec();
    let cert = env.cert.to_str().unwrap();
    let logs = log.to_str().unwrap();
    a.extend(["--ca", cert, "--name", "t1", "--log", logs]);
    let (child, stdin) = run(cli(&a), Some("one\n"));
    let saved = state.0.join("sessions/t1.json");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !std::fs::read(&log).is_ok_and(|d| contains(&d, b"one\n")) {
        assert!(Instant::now() < deadline, "no echo through the CLI");
        std::thread::sleep(Duration::from_millis(20));
    }
    harness::signal(child.id(), libc::SIGTERM);
    let (_, err) = wait(child, Duration::from_secs(5));
    drop(stdin);
    assert!(err.contains("TLSv1_3"), "{err}");
    let json = std::fs::read_to_string(&saved).unwrap();
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["transport"], "tls", "{json}");
    assert_eq!(v["endpoint"], ep, "{json}");
    let canon = std::fs::canonicalize(&env.cert).unwrap();
    assert_eq!(v["tls_ca"], canon.to_str().unwrap(), "{json}");

    // Export/import carry the transport; `resume` reconnects over TLS.
    let out = cli(&["export", "t1"]).output().unwrap();
    let blob = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let out = cli(&["import", &blob, "--name", "t2"]).output().unwrap();
    assert!(out.status.success());
    let v2: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(state.0.join("sessions/t2.json")).unwrap())
            .unwrap();
    assert_eq!(v2["tls_ca"], v["tls_ca"]);
    let list = String::from_utf8_lossy(&cli(&["list"]).output().unwrap().stdout).to_string();
    assert!(list.contains("tls+ca"), "{list}");
    let (child, stdin) = run(cli(&["resume", "t2", "--log", logs]), Some("two\n"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !std::fs::read(&log).is_ok_and(|d| contains(&d, b"two\n")) {
        assert!(Instant::now() < deadline, "no echo after `clawterm resume`");
        std::thread::sleep(Duration::from_millis(20));
    }
    harness::signal(child.id(), libc::SIGTERM);
    let (_, err) = wait(child, Duration::from_secs(5));
    drop(stdin);
    assert!(err.contains("TLSv1_3"), "{err}");
    let d = std::fs::read(&log).unwrap();
    assert_eq!(count(&d, b"one\n"), 1, "{:?}", String::from_utf8_lossy(&d));
}

#[test]
fn cross_shard_resume_over_tls() {
    // Output produced while each client is away, replayed on a new TLS connection.
    let env = TlsEnv::start(
        &[(
            ECHO,
            &[
                "exec",
                "--",
                "sh",
                "-c",
                "while read x; do sleep 0.3; echo \"out-$x\"; done",
            ],
        )],
        2,
        "clawterm=debug",
    );
    let ca = Transport::tls_ca(&env.cert);
    let mut creds = Vec::new();
    let mut open = Vec::new();
    for i in 0..20 {
        let mut s =
            Session::connect_with(&env.endpoint(), TENANT, ECHO, TOKEN, fast_opts(ca.clone()))
                .unwrap();
        s.send(format!("{i}\n").as_bytes()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while s.unacked_bytes() > 0 {
            assert!(Instant::now() < deadline, "input never acknowledged");
            if let Some(Event::Data(d)) = s.recv(Duration::from_millis(10)).unwrap() {
                panic!("output before the drop: {d:?}");
            }
        }
        creds.push(s.credentials(&format!("s{i}")));
        open.push(s);
    }
    // Abrupt: the sockets just close (no SUSPEND, no close_notify handshake awaited).
    drop(open);
    std::thread::sleep(Duration::from_millis(800));
    for (i, c) in creds.iter().enumerate() {
        let mut s = Session::resume_with(c, fast_opts(Transport::Plaintext)).unwrap();
        assert!(s.tls_info().is_some(), "credentials say TLS");
        let want = format!("out-{i}\n");
        let (d, _) = collect_until(&mut s, Duration::from_secs(5), |d| d.len() >= want.len());
        let (more, _) = collect_until(&mut s, Duration::from_secs(2), {
            let t = Instant::now();
            move |_| t.elapsed() > Duration::from_millis(50)
        });
        let all = [d, more].concat();
        assert_eq!(String::from_utf8_lossy(&all), want, "session {i}");
        s.send(format!("again{i}\n").as_bytes()).unwrap();
        let want = format!("out-again{i}\n");
        let (d, _) = collect_until(&mut s, Duration::from_secs(5), |d| d.len() >= want.len());
        assert_eq!(String::from_utf8_lossy(&d), want);
    }
    assert!(
        env.wait_log(
            "resume handed off to the owning shard",
            Duration::from_secs(2)
        ),
        "no resume crossed shards in 20 tries"
    );
}

#[test]
fn certificate_reload_on_sighup() {
    let env = TlsEnv::start(&[(ECHO, &["echo"])], 2, "info");
    let old = env.fingerprint.clone();
    let mut established = Session::connect_with(
        &env.endpoint(),
        TENANT,
        ECHO,
        TOKEN,
        fast_opts(Transport::tls_pin(pin_of(&old))),
    )
    .unwrap();
    echo_roundtrip(&mut established, b"<before-reload>");

    let newdir = env.dir.0.join("newcert");
    std::fs::create_dir_all(&newdir).unwrap();
    let (c2, k2, new) = clawterm::server::tls::self_signed(&newdir).unwrap();
    assert_ne!(new, old);
    std::fs::copy(&c2, &env.cert).unwrap();
    std::fs::copy(&k2, &env.key).unwrap();
    harness::signal(env.server.0.id(), libc::SIGHUP);
    assert!(
        env.wait_log("TLS certificate reloaded", Duration::from_secs(5)),
        "no reload logged"
    );

    let mut n = Session::connect_with(
        &env.endpoint(),
        TENANT,
        ECHO,
        TOKEN,
        fast_opts(Transport::tls_pin(pin_of(&new))),
    )
    .unwrap();
    echo_roundtrip(&mut n, b"<new-cert>");
    let e = Session::connect_with(
        &env.endpoint(),
        TENANT,
        ECHO,
        TOKEN,
        fast_opts(Transport::tls_pin(pin_of(&old))),
    )
    .unwrap_err();
    assert!(e.to_string().contains("does not match the pin"), "{e}");
    assert!(e.to_string().contains(&new), "{e}");
    // The established connection keeps its TLS session.
    echo_roundtrip(&mut established, b"<after-reload>");
    assert!(established.is_connected());
}
