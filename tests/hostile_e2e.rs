//! Abuse and hardening (PROTOCOL.md §5–§6): tokens reloaded when the file changes, per-address
//! limits on failed authentications and on new connections, and every kind of hostile client at
//! once while a measured live session keeps its latency and the server's memory stays bounded.

mod common;
use clawterm_testkit as harness;

use common::*;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn connect_frame(token: &[u8; 32]) -> Vec<u8> {
    encode(
        0,
        1,
        CONNECT,
        0,
        &connect_payload(1, 1, TENANT, AGENT, token),
    )
}

/// Connects (optionally from `src`), sends a CONNECT with `token` and returns the first frame's
/// type and, for an ERROR, its code.
fn attempt(addr: SocketAddr, src: Option<Ipv4Addr>, token: &[u8; 32]) -> (u8, u16) {
    let mut c = match src {
        Some(s) => Client::connect_from(addr, s),
        None => Client::connect(addr),
    };
    c.send_connect(TENANT, AGENT, token);
    let f = c.recv_frame();
    (f.typ, if f.typ == ERROR { f.error_code() } else { 0 })
}

const E_RATE_LIMITED: u16 = 11;

#[test]
fn tokens_file_reloads_when_it_changes_and_a_bad_file_is_ignored() {
    let env = Env::start(CONFIGS[3], &[]);
    let new_token = [0x42u8; 32];
    assert_eq!(
        attempt(env.addr(), None, &new_token),
        (ERROR, E_AUTH_FAILED)
    );
    let tokens = env.dir.0.join("tokens");
    let old = std::fs::read_to_string(&tokens).unwrap();
    // Replace the file the way an operator (or a Secret volume) would: write aside, rename.
    let tmp = env.dir.0.join("tokens.new");
    std::fs::write(&tmp, format!("{old}{TENANT} {}\n", hex(&new_token))).unwrap();
    std::fs::rename(&tmp, &tokens).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if attempt(env.addr(), None, &new_token).0 == ACCEPT {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "new token never accepted: {:?}",
            env.server.log_lines()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // An invalid file never replaces a valid one.
    std::fs::write(&tokens, "this is not a tokens file\n").unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        env.server.log_contains("keeping the previous one"),
        "{:?}",
        env.server.log_lines()
    );
    assert_eq!(attempt(env.addr(), None, &new_token).0, ACCEPT);
    assert_eq!(attempt(env.addr(), None, &TOKEN).0, ACCEPT);
}

#[test]
fn failed_authentications_lock_out_that_address_only() {
    // Limits are per shard (no shared state on the accept path): one shard makes them exact.
    let env = Env::start(CONFIGS[0], &["--max-auth-failures-per-ip", "5"]);
    let bad = [0u8; 32];
    let evil = Ipv4Addr::new(127, 0, 0, 3);
    for _ in 0..5 {
        assert_eq!(
            attempt(env.addr(), Some(evil), &bad),
            (ERROR, E_AUTH_FAILED)
        );
    }
    // Now even a good token from that address is refused, with RATE_LIMITED.
    assert_eq!(
        attempt(env.addr(), Some(evil), &TOKEN),
        (ERROR, E_RATE_LIMITED)
    );
    // Unknown sessions count too, and another address is not affected.
    let other = Ipv4Addr::new(127, 0, 0, 4);
    assert_eq!(attempt(env.addr(), Some(other), &TOKEN).0, ACCEPT);
    let mut c = Client::connect_from(env.addr(), other);
    assert_eq!(
        c.try_resume(0x1234_5678, 0, &[9; 16]),
        Err(E_NO_SUCH_SESSION)
    );
}

#[test]
fn connection_rate_per_address_is_limited() {
    let env = Env::start(CONFIGS[2], &["--max-conn-rate-per-ip", "20"]);
    let src = Ipv4Addr::new(127, 0, 0, 5);
    let mut limited = 0;
    let mut accepted = 0;
    for _ in 0..80 {
        match attempt(env.addr(), Some(src), &TOKEN) {
            (ACCEPT, _) => accepted += 1,
            (ERROR, E_RATE_LIMITED) => limited += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    println!("rate limit 20/s: {accepted} accepted, {limited} RATE_LIMITED out of 80");
    assert!(limited > 0, "no connection was rate limited");
    assert!(
        accepted >= 40,
        "the burst (2 × rate) must get through: {accepted}"
    );
    // Other addresses keep connecting.
    assert_eq!(
        attempt(env.addr(), Some(Ipv4Addr::new(127, 0, 0, 6)), &TOKEN).0,
        ACCEPT
    );
}

fn percentile(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

/// One attacker: called repeatedly with the server address and an iteration number.
type Attack = fn(SocketAddr, u32);

#[test]
fn hostile_clients_all_at_once_do_not_hurt_a_live_session() {
    for cfg in [CONFIGS[1], CONFIGS[3]] {
        let env = Env::start(cfg, &["--handshake-timeout", "1"]);
        let addr = env.addr();
        let mut live = env.session();
        let measure = |live: &mut Client, n: usize| {
            let mut lat = Vec::with_capacity(n);
            for _ in 0..n {
                let t = Instant::now();
                live.echo(b"ping");
                lat.push(t.elapsed());
                std::thread::sleep(Duration::from_millis(5));
            }
            lat
        };
        let mut quiet = measure(&mut live, 100);
        let rss_before = env.server.rss_kib();

        let stop = Arc::new(AtomicBool::new(false));
        let counts: Arc<[AtomicU64; 6]> = Arc::new(Default::default());
        let mut threads = Vec::new();
        let attackers: Vec<(usize, Attack)> = vec![
            // Handshake flood: valid sessions opened and dropped.
            (0, |a, _| {
                let mut c = TcpStream::connect(a).unwrap();
                let _ = c.write_all(&connect_frame(&TOKEN));
                let mut b = [0u8; 64];
                let _ = c.read(&mut b);
            }),
            // Failed tokens from another address.
            (1, |a, _| {
                if let Ok(c) = std::panic::catch_unwind(|| {
                    Client::connect_from(a, Ipv4Addr::new(127, 0, 0, 9))
                }) {
                    let mut c = c;
                    c.send_raw_lossy(&connect_frame(&[7; 32]));
                }
            }),
            // Oversize frame before the handshake.
            (2, |a, _| {
                let mut c = TcpStream::connect(a).unwrap();
                let _ = c.write_all(&header(0, 1, DATA, 0, 65535));
                let _ = c.write_all(&[0u8; 4096]);
            }),
            // Garbage.
            (3, |a, i| {
                let mut c = TcpStream::connect(a).unwrap();
                let junk: Vec<u8> = (0..512u32)
                    .map(|x| (x.wrapping_mul(2654435761).wrapping_add(i) >> 13) as u8)
                    .collect();
                let _ = c.write_all(&junk);
            }),
        ];
        for (slot, f) in attackers {
            let (stop, counts) = (stop.clone(), counts.clone());
            threads.push(std::thread::spawn(move || {
                let mut i = 0u32;
                while !stop.load(Ordering::Relaxed) && i < 3000 {
                    f(addr, i);
                    counts[slot].fetch_add(1, Ordering::Relaxed);
                    i += 1;
                }
            }));
        }
        // Half-open connections and slowloris partial headers, held open.
        let mut held = Vec::new();
        for i in 0..300 {
            if let Ok(mut c) = TcpStream::connect(addr) {
                if i % 2 == 0 {
                    let _ = c.write_all(&[FLAG, 0, 0, 0]);
                }
                held.push(c);
            }
        }
        counts[4].store(held.len() as u64, Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(200));
        let mut loaded = measure(&mut live, 200);
        let rss_during = env.server.rss_kib();
        stop.store(true, Ordering::Relaxed);
        for t in threads {
            t.join().unwrap();
        }
        // The slowloris connections are closed by the handshake timeout.
        std::thread::sleep(Duration::from_millis(1500));
        let mut closed = 0;
        for mut c in held {
            c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            let mut b = [0u8; 16];
            if matches!(c.read(&mut b), Ok(0) | Err(_)) {
                closed += 1;
            }
        }
        live.echo(b"still here");
        let (q50, q99) = (percentile(&mut quiet, 0.5), percentile(&mut quiet, 0.99));
        let (l50, l99) = (percentile(&mut loaded, 0.5), percentile(&mut loaded, 0.99));
        let c: Vec<u64> = counts.iter().map(|x| x.load(Ordering::Relaxed)).collect();
        println!(
            "{cfg:?}: attacks {c:?} (handshakes, bad tokens, oversize, garbage, held); live echo p50/p99 quiet {q50:?}/{q99:?}, under attack {l50:?}/{l99:?}; RSS {rss_before} KiB -> {rss_during} KiB; {closed}/300 held connections closed by the handshake timeout"
        );
        assert!(
            l99 < Duration::from_millis(500),
            "live session p99 {l99:?} under attack"
        );
        assert!(
            rss_during < rss_before + 64 * 1024,
            "server memory grew from {rss_before} to {rss_during} KiB"
        );
        assert_eq!(
            closed, 300,
            "half-open and slowloris connections outlived the handshake timeout"
        );
    }
}
