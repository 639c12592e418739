//! hand_off: "MOVE\n" moves the conn to the other shard; bytes sent right after MOVE (same
//! write and later writes) are delivered exactly once, in order, on the new shard.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;

use shards::{ConnId, Context, Handler, Runtime};

/// Leftover bytes of the buffer that contained MOVE.
struct Moved(Vec<u8>);

#[derive(Default)]
struct Lines {
    partial: HashMap<ConnId, Vec<u8>>,
}

impl Lines {
    fn process(&mut self, ctx: &mut impl Context<Moved>, conn: ConnId, mut buf: Vec<u8>) {
        while let Some(pos) = buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buf.drain(..=pos).collect();
            let line = &line[..line.len() - 1];
            if line == b"MOVE" {
                let target = (ctx.shard() + 1) % ctx.shards();
                ctx.hand_off(conn, target, Moved(buf));
                // Dead here now: sends are ignored.
                assert_eq!(ctx.send(conn, b"ignored\n"), 0);
                return;
            }
            let mut out = format!("{}:", ctx.shard()).into_bytes();
            out.extend_from_slice(line);
            out.push(b'\n');
            ctx.send(conn, &out);
        }
        if !buf.is_empty() {
            self.partial.insert(conn, buf);
        }
    }
}

impl Handler for Lines {
    type Msg = Moved;
    fn on_accept(&mut self, _: &mut impl Context<Moved>, _: ConnId, _: SocketAddr) {}
    fn on_data(&mut self, ctx: &mut impl Context<Moved>, conn: ConnId, data: &[u8]) {
        let mut buf = self.partial.remove(&conn).unwrap_or_default();
        buf.extend_from_slice(data);
        self.process(ctx, conn, buf);
    }
    fn on_closed(&mut self, _: &mut impl Context<Moved>, conn: ConnId, _: Option<std::io::Error>) {
        self.partial.remove(&conn);
    }
    fn on_message(&mut self, _: &mut impl Context<Moved>, _: Moved) {}
    fn on_adopt(
        &mut self,
        ctx: &mut impl Context<Moved>,
        conn: ConnId,
        peer: SocketAddr,
        unread: Vec<u8>,
        msg: Moved,
    ) {
        assert!(peer.ip().is_loopback());
        let mut buf = msg.0;
        buf.extend_from_slice(&unread);
        self.process(ctx, conn, buf);
    }
}

#[test]
fn hand_off_moves_live_conns() {
    hand_off_run(16 * 1024);
}

#[test]
fn hand_off_moves_live_conns_tiny_buffers() {
    // 8-byte receive buffers: the bytes behind MOVE arrive as further completions in the same
    // batch, which the old shard must collect and pass along as `unread`.
    hand_off_run(8);
}

fn hand_off_run(buf_size: usize) {
    for mode in common::modes() {
        let mut cfg = common::config(mode, 2);
        cfg.buf_size = buf_size;
        let rt = Runtime::start(cfg, |_| Lines::default()).unwrap();
        let addr = rt.local_addr().unwrap();
        let threads: Vec<_> = (0..16)
            .map(|c| {
                std::thread::spawn(move || {
                    let s = common::connect(addr);
                    let mut w = s.try_clone().unwrap();
                    let mut r = BufReader::new(s);
                    let mut line = String::new();
                    let mut next = |r: &mut BufReader<_>| {
                        line.clear();
                        r.read_line(&mut line).unwrap();
                        line.trim_end().to_string()
                    };
                    w.write_all(b"hello\n").unwrap();
                    let first = next(&mut r);
                    let mut cur: usize = first[..1].parse().unwrap();
                    assert_eq!(first, format!("{cur}:hello"));
                    for round in 0..25 {
                        // Bytes right behind MOVE in the same write, then more writes
                        // immediately (no waiting for the hand-off), one split mid-line.
                        w.write_all(format!("MOVE\nc{c}r{round}a\nc{c}r{round}b\n").as_bytes())
                            .unwrap();
                        w.write_all(format!("c{c}r{round}c\nc{c}r").as_bytes())
                            .unwrap();
                        w.write_all(format!("{round}d\n").as_bytes()).unwrap();
                        cur = 1 - cur;
                        for suffix in ["a", "b", "c", "d"] {
                            assert_eq!(next(&mut r), format!("{cur}:c{c}r{round}{suffix}"));
                        }
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

/// Output queued before hand_off is delivered before anything the new shard sends.
struct Queued;
impl Handler for Queued {
    type Msg = ();
    fn on_accept(&mut self, _: &mut impl Context<()>, _: ConnId, _: SocketAddr) {}
    fn on_data(&mut self, ctx: &mut impl Context<()>, conn: ConnId, _: &[u8]) {
        ctx.send(conn, &common::pattern(0, 3 * 1024 * 1024));
        ctx.hand_off(conn, (ctx.shard() + 1) % ctx.shards(), ());
    }
    fn on_closed(&mut self, _: &mut impl Context<()>, _: ConnId, _: Option<std::io::Error>) {}
    fn on_message(&mut self, _: &mut impl Context<()>, _: ()) {}
    fn on_adopt(
        &mut self,
        ctx: &mut impl Context<()>,
        conn: ConnId,
        _: SocketAddr,
        _: Vec<u8>,
        _: (),
    ) {
        ctx.send(conn, b"END");
        ctx.close(conn);
    }
}

#[test]
fn hand_off_carries_queued_output() {
    for mode in common::modes() {
        let rt = Runtime::start(common::config(mode, 2), |_| Queued).unwrap();
        let mut s = common::connect(rt.local_addr().unwrap());
        common::write_all(&mut s, b"x");
        let got = common::read_to_eof(&mut s);
        let mut want = common::pattern(0, 3 * 1024 * 1024);
        want.extend_from_slice(b"END");
        assert!(got == want, "{mode:?}: got {} bytes", got.len());
        rt.shutdown();
        rt.join().unwrap();
    }
}
