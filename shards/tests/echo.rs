//! Echo: 200 concurrent TCP clients × 1,000 messages, 1 and 2 shards, both backends.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use shards::{ConnId, Context, Handler, Runtime};

struct Echo;

impl Handler for Echo {
    type Msg = ();
    fn on_accept(&mut self, _ctx: &mut impl Context<()>, _conn: ConnId, _peer: SocketAddr) {}
    fn on_data(&mut self, ctx: &mut impl Context<()>, conn: ConnId, data: &[u8]) {
        ctx.send(conn, data);
    }
    fn on_closed(&mut self, _: &mut impl Context<()>, _: ConnId, _: Option<std::io::Error>) {}
    fn on_message(&mut self, _: &mut impl Context<()>, _: ()) {}
    fn on_adopt(&mut self, _: &mut impl Context<()>, _: ConnId, _: SocketAddr, _: Vec<u8>, _: ()) {}
}

const CLIENTS: usize = 200;
const MESSAGES: usize = 1000;
const BATCH: usize = 20;

fn run_echo(shards: usize) {
    for mode in common::modes() {
        let rt = Runtime::start(common::config(mode, shards), |_| Echo).unwrap();
        let addr = rt.local_addr().unwrap();
        eprintln!("echo: {shards} shard(s), backend {}", rt.backend());
        let threads: Vec<_> = (0..CLIENTS)
            .map(|c| {
                std::thread::spawn(move || {
                    let mut s = common::connect(addr);
                    let mut sent = 0;
                    while sent < MESSAGES {
                        let mut out = Vec::new();
                        for m in sent..(sent + BATCH).min(MESSAGES) {
                            // Variable-length messages, unique per client and message.
                            let len = 1 + (c * 31 + m * 17) % 200;
                            let msg = format!("[{c}:{m}:{}]", "x".repeat(len));
                            out.extend_from_slice(msg.as_bytes());
                        }
                        sent = (sent + BATCH).min(MESSAGES);
                        common::write_all(&mut s, &out);
                        let back = common::read_exact(&mut s, out.len());
                        assert_eq!(back, out, "client {c} got different bytes back");
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        rt.shutdown();
        rt.join().unwrap();
    }
}

#[test]
fn echo_one_shard() {
    run_echo(1);
}

#[test]
fn echo_two_shards() {
    run_echo(2);
}

#[test]
fn echo_small_buffer_ring() {
    // Tiny provided buffers / pool: exercises ENOBUFS re-arming and many partial receives.
    for mode in common::modes() {
        let mut cfg = common::config(mode, 1);
        cfg.buf_size = 64;
        cfg.bufs_per_shard = 2;
        let rt = Runtime::start(cfg, |_| Echo).unwrap();
        let addr = rt.local_addr().unwrap();
        let threads: Vec<_> = (0..20)
            .map(|c| {
                std::thread::spawn(move || {
                    let mut s = common::connect(addr);
                    let data = common::pattern(c, 200_000);
                    let mut r = s.try_clone().unwrap();
                    let w = std::thread::spawn(move || common::write_all(&mut s, &data));
                    let back = common::read_exact(&mut r, 200_000);
                    w.join().unwrap();
                    assert_eq!(back, common::pattern(c, 200_000));
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        rt.shutdown();
        rt.join().unwrap();
    }
    let _ = Duration::ZERO;
}

/// Echoes at the end of each event-loop turn: what `on_data` collected goes out from
/// `on_turn_end`, which every turn ends with, on both backends.
struct TurnEcho {
    pending: Vec<(ConnId, Vec<u8>)>,
}

impl Handler for TurnEcho {
    type Msg = ();
    fn on_accept(&mut self, _ctx: &mut impl Context<()>, _conn: ConnId, _peer: SocketAddr) {}
    fn on_data(&mut self, _ctx: &mut impl Context<()>, conn: ConnId, data: &[u8]) {
        self.pending.push((conn, data.to_vec()));
    }
    fn on_turn_end(&mut self, ctx: &mut impl Context<()>) {
        for (conn, bytes) in self.pending.drain(..) {
            ctx.send(conn, &bytes);
        }
    }
    fn on_closed(&mut self, _: &mut impl Context<()>, _: ConnId, _: Option<std::io::Error>) {}
    fn on_message(&mut self, _: &mut impl Context<()>, _: ()) {}
    fn on_adopt(&mut self, _: &mut impl Context<()>, _: ConnId, _: SocketAddr, _: Vec<u8>, _: ()) {}
}

#[test]
fn turn_end_follows_every_turn() {
    for mode in common::modes() {
        let rt = Runtime::start(common::config(mode, 1), |_| TurnEcho {
            pending: Vec::new(),
        })
        .unwrap();
        let addr = rt.local_addr().unwrap();
        let mut s = common::connect(addr);
        for i in 0..50 {
            let msg = format!("turn {i}");
            common::write_all(&mut s, msg.as_bytes());
            assert_eq!(common::read_exact(&mut s, msg.len()), msg.as_bytes());
        }
        rt.shutdown();
        rt.join().unwrap();
    }
}
