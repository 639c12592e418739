#![allow(dead_code)]
//! Shared helpers for the integration tests: backend parametrisation and socket utilities.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use shards::{probe_uring, Config, IoMode};

/// Backends to run a test against. io_uring is skipped (with a message) when unavailable,
/// unless `CLAWTERM_REQUIRE_URING=1` is set (CI, and any machine known to have io_uring): then
/// an unavailable io_uring fails the test instead of silently testing only epoll.
pub fn modes() -> Vec<IoMode> {
    let mut v = vec![IoMode::Epoll];
    match probe_uring() {
        Ok(()) => v.push(IoMode::Uring),
        Err(reason) if uring_required() => panic!(
            "CLAWTERM_REQUIRE_URING=1 but io_uring is unavailable: probe_uring failed: {reason}"
        ),
        Err(reason) => eprintln!("SKIPPING io_uring variant: probe_uring failed: {reason}"),
    }
    v
}

/// Whether the environment demands the io_uring variants (`CLAWTERM_REQUIRE_URING=1`).
pub fn uring_required() -> bool {
    std::env::var("CLAWTERM_REQUIRE_URING").is_ok_and(|v| v == "1")
}

pub fn config(mode: IoMode, shards: usize) -> Config {
    Config {
        shards,
        cpus: vec![None; shards],
        io: mode,
        listen: Some("127.0.0.1:0".parse().unwrap()),
        ..Config::default()
    }
}

pub fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
    s.set_nodelay(true).unwrap();
    s
}

pub fn read_exact(s: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    s.read_exact(&mut v).expect("read_exact");
    v
}

pub fn write_all(s: &mut TcpStream, b: &[u8]) {
    s.write_all(b).expect("write_all");
}

/// Read until EOF (or error); returns what was read.
pub fn read_to_eof(s: &mut TcpStream) -> Vec<u8> {
    let mut v = Vec::new();
    let mut buf = [0u8; 65536];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return v,
            Ok(n) => v.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                panic!("timed out waiting for EOF after {} bytes", v.len())
            }
            Err(_) => return v,
        }
    }
}

/// Deterministic byte pattern.
pub fn pattern(offset: usize, len: usize) -> Vec<u8> {
    (offset..offset + len).map(|i| (i % 251) as u8).collect()
}
