//! TLS figures for docs/SECURITY.md, against real `clawtermd` processes (loopback):
//!
//! (a) **Full TLS 1.3 handshakes per second on one shard** (`--shards 1 --cpus 0`): client
//!     threads pinned to CPU 1, blocking rustls connections, for `--secs` seconds each:
//!     TCP connect + TLS handshake (then RST), and full session setup (TCP + TLS + CONNECT →
//!     ACCEPT + DISCONNECT). The server shard's CPU use is reported alongside.
//! (b) **Echo throughput over TLS as a ratio of plaintext**: two servers (one TLS, one
//!     plaintext, each one shard on CPU 0), the same load on each: `--echo-sessions`
//!     `clawterm_client::Session`s, closed loop, one outstanding 32-byte DATA each.
//! (c) **Server RSS per idle TLS session**: open `--idle` TLS sessions (and, for comparison, as
//!     many plaintext ones on a plaintext server), VmRSS delta / N from /proc/PID/status.
//! (d) **Server RSS per idle QUIC session**: `--idle-quic` QUIC connections, one session
//!     stream each (CONNECT → ACCEPT), against a TLS server with QUIC on; VmRSS delta / N.
//!
//! ```text
//! cargo build --release -p clawterm --bins
//! cargo run --release -p clawterm-bench --bin tls_figures -- [--secs 5] [--threads 16]
//!     [--echo-sessions 200] [--idle 5000] [--idle-quic 2000]
//! ```

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clawterm_client::core::ClientCore;
use clawterm_client::quic::QuicStream;
use clawterm_client::transport::{client_config, parse_pin};
use clawterm_client::{Event, Options, Session, TlsTrust, Transport};

use clawterm_testkit as harness;

use harness::{
    clawtermd, hex, pin_thread, quic_addr, rss_kib, start_agent, start_server, tcp_addr, Proc,
};

const TENANT: u32 = 1;
const AGENT: u32 = 1;
const TOKEN: [u8; 32] = [0x42; 32];

fn pin_cpu(cpu: usize) {
    let _ = pin_thread(cpu);
}

fn proc_cpu_s(pid: u32) -> f64 {
    harness::proc_cpu_s(pid).unwrap_or(0.0)
}

fn vm_rss_kib(pid: u32) -> u64 {
    rss_kib(pid).unwrap_or(0)
}

/// One server (TLS or plaintext), one shard on CPU 0, with an echo agent.
struct Server {
    proc: Proc,
    _agent: Proc,
    addr: SocketAddr,
    quic: Option<SocketAddr>,
    cert: Option<(PathBuf, String)>,
}

impl Server {
    fn start(dir: &Path, tls: bool) -> Server {
        Server::start_with(dir, tls, false)
    }

    fn start_with(dir: &Path, tls: bool, quic: bool) -> Server {
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir.join("sock")).unwrap();
        let tokens = dir.join("tokens");
        std::fs::write(&tokens, format!("{TENANT} {}\n", hex(&TOKEN))).unwrap();
        let agent = start_agent(&dir.join("sock"), TENANT, AGENT, &["echo"]);
        let mut cmd = clawtermd();
        cmd.args(["--bind", "127.0.0.1", "--port", "0", "--admin", "off"])
            .args(if quic {
                ["--quic-port", "0"]
            } else {
                ["--no-quic", "--no-quic"]
            })
            .args([
                "--shards",
                "1",
                "--cpus",
                "0",
                "--max-conn-rate-per-ip",
                "0",
            ])
            .args(["--max-pending-handshakes", "100000"])
            .arg("--tokens")
            .arg(&tokens)
            .arg("--socket-dir")
            .arg(dir.join("sock"))
            .env("RUST_LOG", "warn,clawterm=info");
        let cert = if tls {
            let (c, k, fp) = clawterm::server::tls::self_signed(dir).unwrap();
            cmd.arg("--tls-cert").arg(&c).arg("--tls-key").arg(&k);
            Some((c, fp))
        } else {
            cmd.arg("--insecure-plaintext");
            None
        };
        let (child, _, line) = start_server(&mut cmd, "clawtermd");
        let proc = Proc(child);
        Server {
            proc,
            _agent: agent,
            addr: tcp_addr(&line).expect("clawtermd's TCP address"),
            quic: quic.then(|| quic_addr(&line).expect("QUIC address")),
            cert,
        }
    }

    fn pid(&self) -> u32 {
        self.proc.0.id()
    }

    fn transport(&self) -> Transport {
        match &self.cert {
            Some((_, fp)) => Transport::tls_pin(parse_pin(fp).unwrap()),
            None => Transport::Plaintext,
        }
    }
}

fn rst_close(s: &TcpStream) {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt with a valid linger struct on an open socket.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&l as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

/// One connection: TCP + TLS handshake (+ CONNECT/ACCEPT/DISCONNECT when `full`).
fn one_handshake(
    addr: SocketAddr,
    cfg: &Arc<rustls::ClientConfig>,
    name: &rustls::pki_types::ServerName<'static>,
    full: bool,
) -> Result<(), String> {
    let mut sock = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    let _ = sock.set_nodelay(true);
    let _ = sock.set_read_timeout(Some(Duration::from_secs(5)));
    rst_close(&sock);
    let mut tls =
        rustls::ClientConnection::new(cfg.clone(), name.clone()).map_err(|e| e.to_string())?;
    while tls.is_handshaking() {
        tls.complete_io(&mut sock).map_err(|e| e.to_string())?;
    }
    if full {
        let mut core = ClientCore::new(TENANT, AGENT, TOKEN);
        core.start_connect([1; 16], 0);
        tls.writer()
            .write_all(&core.take_output())
            .map_err(|e| e.to_string())?;
        let mut buf = [0u8; 4096];
        while !core.is_attached() {
            while tls.wants_write() {
                tls.write_tls(&mut sock).map_err(|e| e.to_string())?;
            }
            if tls.read_tls(&mut sock).map_err(|e| e.to_string())? == 0 {
                return Err("closed".into());
            }
            tls.process_new_packets().map_err(|e| e.to_string())?;
            loop {
                match tls.reader().read(&mut buf) {
                    Ok(0) => return Err("closed".into()),
                    Ok(n) => core.on_bytes(&buf[..n], 0).map_err(|e| e.to_string())?,
                    Err(_) => break,
                }
            }
            if let Some(clawterm_client::core::CoreEvent::Error { code, .. }) = core.poll_event() {
                return Err(format!("ERROR {code}"));
            }
        }
        core.disconnect(0);
        tls.writer()
            .write_all(&core.take_output())
            .map_err(|e| e.to_string())?;
        tls.send_close_notify();
        while tls.wants_write() {
            tls.write_tls(&mut sock).map_err(|e| e.to_string())?;
        }
    }
    Ok(())
}

fn handshake_rate(srv: &Server, threads: usize, secs: f64, full: bool) -> (f64, f64, u64) {
    let fp = &srv.cert.as_ref().unwrap().1;
    let trust = TlsTrust {
        pin: parse_pin(fp),
        ..TlsTrust::default()
    };
    let (cfg, name) = client_config(&trust, &srv.addr.to_string()).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let cpu0 = proc_cpu_s(srv.pid());
    let t0 = Instant::now();
    let hs: Vec<_> = (0..threads)
        .map(|_| {
            let (stop, done, failed, cfg, name) = (
                stop.clone(),
                done.clone(),
                failed.clone(),
                cfg.clone(),
                name.clone(),
            );
            let addr = srv.addr;
            std::thread::spawn(move || {
                pin_cpu(1);
                while !stop.load(Ordering::Relaxed) {
                    match one_handshake(addr, &cfg, &name, full) {
                        Ok(()) => done.fetch_add(1, Ordering::Relaxed),
                        Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                    };
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs_f64(secs));
    let n = done.load(Ordering::Relaxed);
    let el = t0.elapsed().as_secs_f64();
    let cpu = proc_cpu_s(srv.pid()) - cpu0;
    stop.store(true, Ordering::Relaxed);
    for h in hs {
        let _ = h.join();
    }
    (n as f64 / el, cpu / el, failed.load(Ordering::Relaxed))
}

fn opts(t: Transport) -> Options {
    Options {
        transport: t,
        ..Options::default()
    }
}

/// Closed-loop 32-byte echo with `n` sessions over `threads` client threads (CPU 1).
fn echo_rate(srv: &Server, n: usize, threads: usize, secs: f64) -> (f64, f64) {
    let ready = Arc::new(std::sync::Barrier::new(threads + 1));
    let go = Arc::new(std::sync::Barrier::new(threads + 1));
    let stop = Arc::new(AtomicBool::new(false));
    let total = Arc::new(AtomicU64::new(0));
    let hs: Vec<_> = (0..threads)
        .map(|t| {
            let per = n / threads + usize::from(t < n % threads);
            let (ready, go, stop, total) = (ready.clone(), go.clone(), stop.clone(), total.clone());
            let (addr, tr) = (srv.addr.to_string(), srv.transport());
            std::thread::spawn(move || {
                pin_cpu(1);
                let mut ss: Vec<Session> = (0..per)
                    .map(|_| {
                        Session::connect_with(&addr, TENANT, AGENT, TOKEN, opts(tr.clone()))
                            .unwrap()
                    })
                    .collect();
                ready.wait();
                go.wait();
                let payload = [b'x'; 32];
                let mut got = vec![0usize; per];
                let mut count = 0u64;
                for s in &mut ss {
                    s.send(&payload).unwrap();
                }
                while !stop.load(Ordering::Relaxed) {
                    // A session with no descriptor right now (retrying) reports nothing.
                    let mut revents = vec![0i16; ss.len()];
                    {
                        let fds: Vec<(std::os::fd::BorrowedFd<'_>, i16)> = ss
                            .iter()
                            .filter_map(|s| {
                                let ev =
                                    libc::POLLIN | if s.wants_write() { libc::POLLOUT } else { 0 };
                                s.poll_fd().map(|fd| (fd, ev))
                            })
                            .collect();
                        let mut got = vec![0i16; fds.len()];
                        let _ = clawterm_poll::wait(&fds, &mut got, 5);
                        let mut k = 0;
                        for (i, s) in ss.iter().enumerate() {
                            if s.poll_fd().is_some() {
                                revents[i] = got[k];
                                k += 1;
                            }
                        }
                    }
                    for (i, s) in ss.iter_mut().enumerate() {
                        if revents[i] == 0 && !s.wants_write() {
                            continue;
                        }
                        while let Some(ev) = s.try_recv().unwrap() {
                            if let Event::Data(d) = ev {
                                got[i] += d.len();
                                while got[i] >= 32 {
                                    got[i] -= 32;
                                    count += 1;
                                    s.send(&payload).unwrap();
                                }
                            }
                        }
                    }
                }
                total.fetch_add(count, Ordering::Relaxed);
                for s in ss {
                    s.end();
                }
            })
        })
        .collect();
    ready.wait();
    let cpu0 = proc_cpu_s(srv.pid());
    let t0 = Instant::now();
    go.wait();
    std::thread::sleep(Duration::from_secs_f64(secs));
    stop.store(true, Ordering::Relaxed);
    let el = t0.elapsed().as_secs_f64();
    let cpu = proc_cpu_s(srv.pid()) - cpu0;
    for h in hs {
        h.join().unwrap();
    }
    (total.load(Ordering::Relaxed) as f64 / el, cpu / el)
}

/// Opens `n` idle sessions; returns (RSS before KiB, after KiB).
fn idle_rss(srv: &Server, n: usize, threads: usize) -> (u64, u64, Vec<Vec<Session>>) {
    // Warm up the allocator and the agent link.
    for _ in 0..20 {
        Session::connect_with(
            &srv.addr.to_string(),
            TENANT,
            AGENT,
            TOKEN,
            opts(srv.transport()),
        )
        .unwrap()
        .end();
    }
    std::thread::sleep(Duration::from_millis(500));
    let before = vm_rss_kib(srv.pid());
    let hs: Vec<_> = (0..threads)
        .map(|t| {
            let per = n / threads + usize::from(t < n % threads);
            let (addr, tr) = (srv.addr.to_string(), srv.transport());
            std::thread::spawn(move || {
                pin_cpu(1);
                (0..per)
                    .map(|_| {
                        Session::connect_with(&addr, TENANT, AGENT, TOKEN, opts(tr.clone()))
                            .unwrap()
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let held: Vec<Vec<Session>> = hs.into_iter().map(|h| h.join().unwrap()).collect();
    std::thread::sleep(Duration::from_millis(1000));
    let after = vm_rss_kib(srv.pid());
    (before, after, held)
}

/// Opens `n` idle QUIC sessions (one connection and stream each, CONNECT → ACCEPT); returns
/// (RSS before KiB, after KiB) and the streams (kept open while RSS is read).
fn idle_quic_rss(srv: &Server, n: usize) -> (u64, u64, Vec<QuicStream>) {
    let quic = srv.quic.expect("QUIC on");
    let (c, _) = &srv.cert.clone().expect("TLS");
    let trust = TlsTrust {
        ca: Some(c.clone()),
        ..TlsTrust::default()
    };
    let (cfg, _) = client_config(&trust, "localhost:7221").unwrap();
    let open = |cfg: &std::sync::Arc<rustls::ClientConfig>| {
        let mut s = QuicStream::connect(
            quic,
            "localhost",
            cfg.clone(),
            None,
            None,
            Duration::from_secs(10),
        )
        .expect("QUIC handshake");
        s.set_read_timeout(Some(Duration::from_secs(10)));
        let mut core = ClientCore::new(TENANT, AGENT, TOKEN);
        core.start_connect([2; 16], 0);
        s.write_all(&core.take_output()).unwrap();
        s.flush().unwrap();
        let mut buf = [0u8; 4096];
        while !core.is_attached() {
            let n = s.read(&mut buf).expect("ACCEPT over QUIC");
            assert!(n > 0, "stream ended before ACCEPT");
            core.on_bytes(&buf[..n], 0).expect("valid frames");
        }
        s
    };
    for _ in 0..20 {
        let mut s = open(&cfg);
        s.close();
    }
    std::thread::sleep(Duration::from_millis(500));
    let before = vm_rss_kib(srv.pid());
    let held: Vec<QuicStream> = (0..n).map(|_| open(&cfg)).collect();
    std::thread::sleep(Duration::from_millis(1000));
    let after = vm_rss_kib(srv.pid());
    (before, after, held)
}

fn arg(args: &[String], name: &str, default: f64) -> f64 {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let secs = arg(&args, "--secs", 5.0);
    let threads = arg(&args, "--threads", 16.0) as usize;
    let echo_sessions = arg(&args, "--echo-sessions", 200.0) as usize;
    let idle = arg(&args, "--idle", 5000.0) as usize;
    let idle_quic = arg(&args, "--idle-quic", 2000.0) as usize;
    // SAFETY: plain getrlimit/setrlimit on this process.
    unsafe {
        let mut r: libc::rlimit = std::mem::zeroed();
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut r);
        r.rlim_cur = r.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &r);
    }
    let base = std::env::temp_dir().join(format!("ct-tls-figures-{}", std::process::id()));
    println!(
        "tls_figures: loopback, server 1 shard pinned to CPU 0, client on CPU 1 ({} CPUs online)",
        // SAFETY: sysconf(3) reads a system value; no memory is involved.
        unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }
    );

    // (a)
    {
        let srv = Server::start(&base.join("a"), true);
        // A short warm-up so that neither measured phase pays for process start.
        handshake_rate(&srv, threads, 1.0, false);
        let (r, cpu, f) = handshake_rate(&srv, threads, secs, false);
        println!(
            "(a) TLS 1.3 handshakes (TCP connect + handshake, pinned cert, ECDSA P-256): {r:.0}/s \
             over {secs} s, {threads} client threads; server shard CPU {:.0}% = {:.0} us/handshake \
             (one shard saturated: ~{:.0}/s); failures {f}",
            cpu * 100.0,
            cpu / r * 1e6,
            r / cpu.max(1e-9)
        );
        let (r2, cpu2, f2) = handshake_rate(&srv, threads, secs, true);
        println!(
            "(a) full session setup (TCP + TLS 1.3 + CONNECT/ACCEPT + DISCONNECT): {r2:.0}/s; \
             server shard CPU {:.0}% = {:.0} us/setup (one shard saturated: ~{:.0}/s); failures {f2}",
            cpu2 * 100.0,
            cpu2 / r2 * 1e6,
            r2 / cpu2.max(1e-9)
        );
    }
    // (b)
    {
        let tls = Server::start(&base.join("b-tls"), true);
        let plain = Server::start(&base.join("b-plain"), false);
        let ct = threads.clamp(1, 8);
        let (p, pcpu) = echo_rate(&plain, echo_sessions, ct, secs);
        let (t, tcpu) = echo_rate(&tls, echo_sessions, ct, secs);
        println!(
            "(b) echo, {echo_sessions} sessions closed loop, 32 B, {secs} s each: plaintext \
             {p:.0} echoes/s (server CPU {:.0}%), TLS {t:.0} echoes/s (server CPU {:.0}%); \
             TLS/plaintext = {:.2}; per server CPU-second: plaintext {:.0}, TLS {:.0} (ratio {:.2})",
            pcpu * 100.0,
            tcpu * 100.0,
            t / p,
            p / pcpu.max(1e-9),
            t / tcpu.max(1e-9),
            (t / tcpu.max(1e-9)) / (p / pcpu.max(1e-9))
        );
    }
    // (c)
    {
        let ct = threads.clamp(1, 8);
        let tls = Server::start(&base.join("c-tls"), true);
        let (b, a, held) = idle_rss(&tls, idle, ct);
        println!(
            "(c) idle TLS sessions: {idle}; server VmRSS {b} KiB -> {a} KiB; {:.2} KiB/session",
            (a.saturating_sub(b)) as f64 / idle as f64
        );
        drop(held);
        drop(tls);
        let plain = Server::start(&base.join("c-plain"), false);
        let (b2, a2, held) = idle_rss(&plain, idle, ct);
        println!(
            "(c) idle plaintext sessions (comparison): {idle}; server VmRSS {b2} KiB -> {a2} KiB; \
             {:.2} KiB/session",
            (a2.saturating_sub(b2)) as f64 / idle as f64
        );
        drop(held);
    }
    // (d)
    {
        let srv = Server::start_with(&base.join("d-quic"), true, true);
        // The client side runs on CPU 1 (after the server started: children inherit it).
        pin_cpu(1);
        let (b, a, held) = idle_quic_rss(&srv, idle_quic);
        println!(
            "(d) idle QUIC sessions: {idle_quic} connections, one session stream each; server \
             VmRSS {b} KiB -> {a} KiB; {:.2} KiB/session",
            (a.saturating_sub(b)) as f64 / idle_quic as f64
        );
        drop(held);
    }
    let _ = std::fs::remove_dir_all(&base);
}
