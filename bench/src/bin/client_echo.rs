//! The Rust client library's echo figures, the baseline of the Python binding's
//! (`clients/python/bench/figures.py` runs both against the same server, alternating):
//!
//! ```text
//! client_echo ENDPOINT TENANT AGENT TOKEN_HEX rtt SECS      # 32-byte round trips, one at a time
//! client_echo ENDPOINT TENANT AGENT TOKEN_HEX bulk SECS     # 64 KiB writes, 1 MiB in flight
//! ```
//!
//! Prints one JSON line: `{"mode":…, "count":…, "bytes":…, "secs":…}`.

use clawterm_client::{Event, Session};
use std::time::{Duration, Instant};

fn main() {
    let a: Vec<String> = std::env::args().skip(1).collect();
    if a.len() != 6 {
        eprintln!("usage: client_echo ENDPOINT TENANT AGENT TOKEN_HEX rtt|bulk SECS");
        std::process::exit(2);
    }
    let mut token = [0u8; 32];
    if hex::decode_to_slice(&a[3], &mut token).is_err() {
        eprintln!("client_echo: the token must be 64 hex digits");
        std::process::exit(2);
    }
    let (tenant, agent): (u32, u32) = match (a[1].parse(), a[2].parse()) {
        (Ok(t), Ok(g)) => (t, g),
        _ => {
            eprintln!("client_echo: TENANT and AGENT are numbers");
            std::process::exit(2);
        }
    };
    let secs: f64 = a[5].parse().unwrap_or(3.0);
    let mut s = match Session::connect(&a[0], tenant, agent, token) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("client_echo: {e}");
            std::process::exit(1);
        }
    };
    let until = Instant::now() + Duration::from_secs_f64(secs);
    let t0 = Instant::now();
    let (mut count, mut bytes) = (0u64, 0u64);
    let recv = |s: &mut Session| -> usize {
        match s.recv(Duration::from_secs(10)) {
            Ok(Some(Event::Data(d))) => d.len(),
            Ok(_) => 0,
            Err(e) => {
                eprintln!("client_echo: {e}");
                std::process::exit(1);
            }
        }
    };
    match a[4].as_str() {
        "rtt" => {
            let msg = [b'x'; 32];
            while Instant::now() < until {
                s.send(&msg).expect("send");
                let mut got = 0;
                while got < msg.len() {
                    got += recv(&mut s);
                }
                count += 1;
                bytes += msg.len() as u64;
            }
        }
        _ => {
            let chunk = vec![b'y'; 64 * 1024];
            let (mut sent, mut got) = (0u64, 0u64);
            while Instant::now() < until {
                while sent - got < 1 << 20 {
                    s.send(&chunk).expect("send");
                    sent += chunk.len() as u64;
                }
                got += recv(&mut s) as u64;
            }
            while got < sent {
                got += recv(&mut s) as u64;
            }
            count = sent / chunk.len() as u64;
            bytes = got;
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    s.end();
    println!(
        "{{\"mode\":\"{}\",\"count\":{count},\"bytes\":{bytes},\"secs\":{secs}}}",
        a[4]
    );
}
