//! A second runtime takes over the first one's listening sockets (a live upgrade): started
//! paused, it takes no connection until `start_accepting`; the first one's
//! `stop_accepting` ends with `on_accept_stopped`, after which no `on_accept` comes. A
//! connection made while neither accepts waits in the kernel's queue and is served by the
//! second runtime: nothing is refused.

mod common;

use std::io::Read;
use std::net::SocketAddr;
use std::sync::mpsc;
use std::time::Duration;

use shards::{ConnId, Context, Handler, Runtime};

enum Msg {
    Stop,
    Start,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Ev {
    Accepted(&'static str),
    AcceptStopped(&'static str),
}

/// Echoes with its name in front; reports accepts and the end of accepting.
struct Echo {
    name: &'static str,
    tx: mpsc::Sender<Ev>,
}

impl Handler for Echo {
    type Msg = Msg;
    fn on_accept(&mut self, _: &mut impl Context<Msg>, _: ConnId, _: SocketAddr) {
        let _ = self.tx.send(Ev::Accepted(self.name));
    }
    fn on_data(&mut self, ctx: &mut impl Context<Msg>, conn: ConnId, data: &[u8]) {
        let mut out = self.name.as_bytes().to_vec();
        out.extend_from_slice(data);
        ctx.send(conn, &out);
    }
    fn on_closed(&mut self, _: &mut impl Context<Msg>, _: ConnId, _: Option<std::io::Error>) {}
    fn on_message(&mut self, ctx: &mut impl Context<Msg>, m: Msg) {
        match m {
            Msg::Stop => ctx.stop_accepting(),
            Msg::Start => ctx.start_accepting(),
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
        let _ = self.tx.send(Ev::AcceptStopped(self.name));
    }
}

#[test]
fn paused_runtime_takes_over_the_listener() {
    for mode in common::modes() {
        let (tx, rx) = mpsc::channel();
        let tx_a = tx.clone();
        let a = Runtime::start(common::config(mode, 1), move |_| Echo {
            name: "A",
            tx: tx_a.clone(),
        })
        .unwrap();
        let addr = a.local_addr().unwrap();
        // A serves.
        let mut s = common::connect(addr);
        common::write_all(&mut s, b"1");
        assert_eq!(common::read_exact(&mut s, 2), b"A1");
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(10)),
            Ok(Ev::Accepted("A"))
        );

        let mut inherited = a.listening_sockets().unwrap();
        inherited.paused = true;
        let tx_b = tx.clone();
        let b = Runtime::start_inherited(common::config(mode, 1), inherited, move |_| Echo {
            name: "B",
            tx: tx_b.clone(),
        })
        .unwrap();
        assert_eq!(b.local_addr(), Some(addr), "{mode:?}");
        a.remote().send(0, Msg::Stop);
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(10)),
            Ok(Ev::AcceptStopped("A")),
            "{mode:?}"
        );
        // Neither accepts now: the connection waits in the queue, nothing answers.
        let mut waiting = common::connect(addr);
        common::write_all(&mut waiting, b"2");
        waiting
            .set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let mut buf = [0u8; 8];
        assert!(
            waiting.read(&mut buf).is_err(),
            "{mode:?}: answered while paused"
        );
        assert!(rx.try_recv().is_err(), "{mode:?}: accepted while paused");
        // The old connection is still A's.
        common::write_all(&mut s, b"3");
        assert_eq!(common::read_exact(&mut s, 2), b"A3");
        // B starts accepting: the queued connection is B's, with its bytes.
        b.remote().send(0, Msg::Start);
        waiting
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        assert_eq!(common::read_exact(&mut waiting, 2), b"B2", "{mode:?}");
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(10)),
            Ok(Ev::Accepted("B"))
        );
        // And new ones too; A never accepts again.
        let mut fresh = common::connect(addr);
        common::write_all(&mut fresh, b"4");
        assert_eq!(common::read_exact(&mut fresh, 2), b"B4", "{mode:?}");
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(10)),
            Ok(Ev::Accepted("B"))
        );
        drop((s, waiting, fresh));
        for rt in [a, b] {
            rt.shutdown();
            rt.join().unwrap();
        }
        assert!(
            rx.try_iter().all(|e| e != Ev::Accepted("A")),
            "{mode:?}: A accepted after on_accept_stopped"
        );
    }
}

/// A runtime stopped from accepting before it ever did still says so (its accept was never
/// armed, or was armed and is cancelled).
#[test]
fn stop_accepting_is_acknowledged_once() {
    for mode in common::modes() {
        for paused in [false, true] {
            let (tx, rx) = mpsc::channel();
            let a = Runtime::start(common::config(mode, 2), move |_| Echo {
                name: "A",
                tx: tx.clone(),
            })
            .unwrap();
            let mut inherited = a.listening_sockets().unwrap();
            inherited.paused = paused;
            let (tx2, rx2) = mpsc::channel();
            let b = Runtime::start_inherited(common::config(mode, 2), inherited, move |_| Echo {
                name: "B",
                tx: tx2.clone(),
            })
            .unwrap();
            let rt = if paused { &b } else { &a };
            let rx = if paused { &rx2 } else { &rx };
            for i in 0..2 {
                rt.remote().send(i, Msg::Stop);
            }
            let name = if paused { "B" } else { "A" };
            for _ in 0..2 {
                assert_eq!(
                    rx.recv_timeout(Duration::from_secs(10)),
                    Ok(Ev::AcceptStopped(name)),
                    "{mode:?} paused={paused}"
                );
            }
            for i in 0..2 {
                rt.remote().send(i, Msg::Stop);
            }
            std::thread::sleep(Duration::from_millis(100));
            assert!(rx.try_recv().is_err(), "{mode:?}: acknowledged twice");
            for rt in [a, b] {
                rt.shutdown();
                rt.join().unwrap();
            }
        }
    }
}
