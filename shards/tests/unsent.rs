//! `Ctx::unsent`: output the peer has not received yet (the conn's queue plus the kernel's
//! unsent and unacknowledged bytes, SIOCOUTQ). A peer that does not read keeps it above zero;
//! once it has read everything it drops to zero.

mod common;

use std::io::Read;
use std::net::SocketAddr;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use shards::{ConnId, Context, Handler, Runtime};

const TOTAL: usize = 4 * 1024 * 1024;

enum Msg {
    /// Report `unsent` of the connection being served.
    Query,
}

struct Sender {
    conn: Option<ConnId>,
    tx: mpsc::Sender<Option<usize>>,
}

impl Handler for Sender {
    type Msg = Msg;
    fn on_accept(&mut self, ctx: &mut impl Context<Msg>, conn: ConnId, _peer: SocketAddr) {
        self.conn = Some(conn);
        ctx.send(conn, &common::pattern(0, TOTAL));
    }
    fn on_data(&mut self, _: &mut impl Context<Msg>, _: ConnId, _: &[u8]) {}
    fn on_closed(&mut self, _: &mut impl Context<Msg>, _: ConnId, _: Option<std::io::Error>) {}
    fn on_message(&mut self, ctx: &mut impl Context<Msg>, Msg::Query: Msg) {
        let _ = self.tx.send(self.conn.and_then(|c| ctx.unsent(c)));
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
}

fn query(rt: &Runtime<Msg>, rx: &mpsc::Receiver<Option<usize>>) -> Option<usize> {
    assert!(rt.remote().send(0, Msg::Query));
    rx.recv_timeout(Duration::from_secs(10)).expect("no answer")
}

#[test]
fn unsent_counts_what_the_peer_has_not_received() {
    for mode in common::modes() {
        let (tx, rx) = mpsc::channel();
        let rt = Runtime::start(common::config(mode, 1), move |_| Sender {
            conn: None,
            tx: tx.clone(),
        })
        .unwrap();
        let mut c = common::connect(rt.local_addr().unwrap());
        // Not reading: the 4 MiB cannot all have reached this socket (its receive buffer is
        // far smaller), so some is still unsent.
        std::thread::sleep(Duration::from_millis(200));
        let n = query(&rt, &rx).expect("conn known");
        assert!(n > 0, "{mode:?}: unsent is 0 while the peer reads nothing");
        assert!(n <= TOTAL, "{mode:?}: unsent {n} > sent {TOTAL}");
        // Read everything: unsent drops to 0 once the peer's TCP has acknowledged the last byte.
        let got = common::read_exact(&mut c, TOTAL);
        assert_eq!(
            got,
            common::pattern(0, TOTAL),
            "{mode:?}: bytes out of order"
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let n = query(&rt, &rx).expect("conn known");
            if n == 0 {
                break;
            }
            assert!(Instant::now() < deadline, "{mode:?}: unsent stuck at {n}");
            std::thread::sleep(Duration::from_millis(10));
        }
        let mut b = [0u8; 1];
        c.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        assert!(c.read(&mut b).is_err(), "{mode:?}: more bytes than sent");
        rt.shutdown();
        rt.join().unwrap();
    }
}
