//! Large transfer with backpressure: a client that does not read while the handler sends
//! 20 MiB; is_backpressured becomes true, on_writable fires after the client starts reading,
//! and all bytes arrive in order.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use shards::{ConnId, Context, Handler, Runtime};

const TOTAL: usize = 20 * 1024 * 1024;
const CHUNK: usize = 64 * 1024;

#[derive(Default)]
struct Stats {
    backpressured: AtomicUsize,
    writable: AtomicUsize,
    max_queued: AtomicUsize,
}

struct Pump {
    sent: HashMap<ConnId, usize>,
    stats: Arc<Stats>,
}

impl Pump {
    fn pump(&mut self, ctx: &mut impl Context<()>, conn: ConnId) {
        let Some(sent) = self.sent.get_mut(&conn) else {
            return;
        };
        while *sent < TOTAL && !ctx.is_backpressured(conn) {
            let n = CHUNK.min(TOTAL - *sent);
            let queued = ctx.send(conn, &common::pattern(*sent, n));
            self.stats.max_queued.fetch_max(queued, Ordering::SeqCst);
            *sent += n;
        }
        if ctx.is_backpressured(conn) {
            self.stats.backpressured.fetch_add(1, Ordering::SeqCst);
        }
        if *sent == TOTAL {
            self.sent.remove(&conn);
            ctx.close(conn); // flushes the rest first
        }
    }
}

impl Handler for Pump {
    type Msg = ();
    fn on_accept(&mut self, _ctx: &mut impl Context<()>, _conn: ConnId, _peer: SocketAddr) {}
    fn on_data(&mut self, ctx: &mut impl Context<()>, conn: ConnId, data: &[u8]) {
        if data.starts_with(b"GO") && !self.sent.contains_key(&conn) {
            self.sent.insert(conn, 0);
            self.pump(ctx, conn);
        }
    }
    fn on_writable(&mut self, ctx: &mut impl Context<()>, conn: ConnId) {
        self.stats.writable.fetch_add(1, Ordering::SeqCst);
        self.pump(ctx, conn);
    }
    fn on_closed(&mut self, _: &mut impl Context<()>, conn: ConnId, _: Option<std::io::Error>) {
        self.sent.remove(&conn);
    }
    fn on_message(&mut self, _: &mut impl Context<()>, _: ()) {}
    fn on_adopt(&mut self, _: &mut impl Context<()>, _: ConnId, _: SocketAddr, _: Vec<u8>, _: ()) {}
}

#[test]
fn large_transfer_with_backpressure() {
    for mode in common::modes() {
        let stats = Arc::new(Stats::default());
        let st = stats.clone();
        let cfg = common::config(mode, 1);
        let high = cfg.high_watermark;
        let rt = Runtime::start(cfg, move |_| Pump {
            sent: HashMap::new(),
            stats: st.clone(),
        })
        .unwrap();
        let mut s = common::connect(rt.local_addr().unwrap());
        common::write_all(&mut s, b"GO");
        // Don't read for a while: socket buffers fill up, the queue crosses the watermark.
        std::thread::sleep(Duration::from_millis(300));
        assert!(
            stats.backpressured.load(Ordering::SeqCst) > 0,
            "{mode:?}: never backpressured"
        );
        let got = common::read_to_eof(&mut s);
        assert_eq!(got.len(), TOTAL, "{mode:?}: byte count");
        assert!(
            got == common::pattern(0, TOTAL),
            "{mode:?}: bytes out of order"
        );
        assert!(
            stats.writable.load(Ordering::SeqCst) > 0,
            "{mode:?}: on_writable never fired"
        );
        // The handler honoured backpressure: the queue never grew far past the watermark.
        assert!(stats.max_queued.load(Ordering::SeqCst) <= high + CHUNK);
        rt.shutdown();
        rt.join().unwrap();
    }
}
