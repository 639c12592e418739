//! Extra listeners (`Config::extra_listen`): each shard accepts on every listener, a
//! connection says which one it came from (`on_accept_at`), and a runtime that inherits the
//! sockets (a live upgrade) serves all of them on the same addresses; `stop_accepting` ends
//! every listener's accept and reports `on_accept_stopped` once.

mod common;

use std::net::SocketAddr;
use std::sync::mpsc;
use std::time::Duration;

use shards::{ConnId, Context, Handler, Runtime};

enum Msg {
    Stop,
}

/// Answers each connection's bytes with the index of the listener that accepted it.
struct Tagged {
    listener_of: std::collections::HashMap<ConnId, usize>,
    stopped: mpsc::Sender<()>,
}

impl Handler for Tagged {
    type Msg = Msg;
    fn on_accept(&mut self, _: &mut impl Context<Msg>, _: ConnId, _: SocketAddr) {
        unreachable!("on_accept_at is overridden");
    }
    fn on_accept_at(&mut self, _: &mut impl Context<Msg>, conn: ConnId, _: SocketAddr, l: usize) {
        self.listener_of.insert(conn, l);
    }
    fn on_data(&mut self, ctx: &mut impl Context<Msg>, conn: ConnId, data: &[u8]) {
        let l = self.listener_of.get(&conn).copied().unwrap_or(99);
        let mut out = vec![b'0' + l as u8];
        out.extend_from_slice(data);
        ctx.send(conn, &out);
    }
    fn on_closed(&mut self, _: &mut impl Context<Msg>, conn: ConnId, _: Option<std::io::Error>) {
        self.listener_of.remove(&conn);
    }
    fn on_message(&mut self, ctx: &mut impl Context<Msg>, m: Msg) {
        match m {
            Msg::Stop => ctx.stop_accepting(),
        }
    }
    fn on_adopt(
        &mut self,
        _: &mut impl Context<Msg>,
        _: ConnId,
        _: SocketAddr,
        _: Vec<u8>,
        _: Msg,
    ) {
    }
    fn on_accept_stopped(&mut self, _: &mut impl Context<Msg>) {
        let _ = self.stopped.send(());
    }
}

fn ask(addr: SocketAddr, what: &[u8]) -> Vec<u8> {
    let mut s = common::connect(addr);
    common::write_all(&mut s, what);
    common::read_exact(&mut s, what.len() + 1)
}

#[test]
fn every_listener_accepts_and_says_which_it_is() {
    for mode in common::modes() {
        let mut cfg = common::config(mode, 2);
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        cfg.extra_listen = vec![any, any];
        let (tx, rx) = mpsc::channel();
        let tx_a = tx.clone();
        let a = Runtime::start(cfg.clone(), move |_| Tagged {
            listener_of: Default::default(),
            stopped: tx_a.clone(),
        })
        .unwrap();
        let main = a.local_addr().unwrap();
        let extra = a.extra_local_addrs().to_vec();
        assert_eq!(extra.len(), 2, "{mode:?}");
        assert!(extra[0].port() != 0 && extra[0] != extra[1] && extra[0] != main);
        // Many connections, so both shards' sockets of each listener take some.
        for _ in 0..8 {
            assert_eq!(ask(main, b"x"), b"0x", "{mode:?}");
            assert_eq!(ask(extra[0], b"y"), b"1y", "{mode:?}");
            assert_eq!(ask(extra[1], b"z"), b"2z", "{mode:?}");
        }
        // A live upgrade: the next runtime takes every listener over, on the same addresses.
        let mut inherited = a.listening_sockets().unwrap();
        assert_eq!(inherited.extra.len(), 2);
        assert!(inherited.extra.iter().all(|v| v.len() == 2));
        inherited.paused = false;
        for s in 0..2 {
            a.remote().send(s, Msg::Stop);
        }
        for _ in 0..2 {
            rx.recv_timeout(Duration::from_secs(10))
                .unwrap_or_else(|_| panic!("{mode:?}: on_accept_stopped never came"));
        }
        assert!(
            rx.recv_timeout(Duration::from_millis(200)).is_err(),
            "{mode:?}: on_accept_stopped came more than once per shard"
        );
        let tx_b = tx.clone();
        let b = Runtime::start_inherited(cfg, inherited, move |_| Tagged {
            listener_of: Default::default(),
            stopped: tx_b.clone(),
        })
        .unwrap();
        assert_eq!(b.local_addr(), Some(main));
        assert_eq!(b.extra_local_addrs(), &extra[..], "{mode:?}");
        for _ in 0..4 {
            assert_eq!(ask(extra[1], b"w"), b"2w", "{mode:?}");
            assert_eq!(ask(main, b"v"), b"0v", "{mode:?}");
        }
        a.shutdown();
        a.join().unwrap();
        b.shutdown();
        b.join().unwrap();
    }
}
