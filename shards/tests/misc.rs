//! Mailbox, timers, set_reading, close-flush, shutdown, slab accounting, panics, config.

mod common;

use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use shards::{parse_cpu_list, Backend, ConnId, Context, Handler, IoMode, Runtime};

const T: Duration = Duration::from_secs(10);

// ---------- mailbox ----------

enum MbMsg {
    Ping(u32),
    Pong { n: u32, from: usize },
}

struct Mailbox {
    tx: mpsc::Sender<(u32, usize, usize)>,
}

impl Handler for Mailbox {
    type Msg = MbMsg;
    fn on_accept(&mut self, _: &mut impl Context<MbMsg>, _: ConnId, _: SocketAddr) {}
    fn on_data(&mut self, _: &mut impl Context<MbMsg>, _: ConnId, _: &[u8]) {}
    fn on_closed(&mut self, _: &mut impl Context<MbMsg>, _: ConnId, _: Option<std::io::Error>) {}
    fn on_message(&mut self, ctx: &mut impl Context<MbMsg>, msg: MbMsg) {
        match msg {
            MbMsg::Ping(n) => {
                let to = (ctx.shard() + 1) % ctx.shards();
                let from = ctx.shard();
                ctx.send_to_shard(to, MbMsg::Pong { n, from });
            }
            MbMsg::Pong { n, from } => self.tx.send((n, from, ctx.shard())).unwrap(),
        }
    }
    fn on_adopt(
        &mut self,
        _: &mut impl Context<MbMsg>,
        _: ConnId,
        _: SocketAddr,
        _: Vec<u8>,
        _: MbMsg,
    ) {
    }
}

#[test]
fn mailbox_round_trip() {
    for mode in common::modes() {
        let (tx, rx) = mpsc::channel();
        let mut cfg = common::config(mode, 2);
        cfg.listen = None;
        let rt = Runtime::start(cfg, move |_| Mailbox { tx: tx.clone() }).unwrap();
        let remote = rt.remote();
        let r2 = remote.clone();
        // Posted from another thread, many at once.
        std::thread::spawn(move || {
            for n in 0..1000u32 {
                assert!(r2.send((n % 2) as usize, MbMsg::Ping(n)));
            }
        })
        .join()
        .unwrap();
        assert!(
            !remote.send(7, MbMsg::Ping(0)),
            "out-of-range shard must be refused"
        );
        let mut seen = vec![false; 1000];
        for _ in 0..1000 {
            let (n, from, at) = rx.recv_timeout(T).unwrap();
            assert_eq!(from, (n % 2) as usize);
            assert_eq!(at, 1 - from);
            assert!(!seen[n as usize]);
            seen[n as usize] = true;
        }
        remote.stop();
        rt.join().unwrap();
    }
}

// ---------- wake_at ----------

struct Ticker {
    ticks: u32,
    tx: mpsc::Sender<u32>,
}

impl Handler for Ticker {
    type Msg = ();
    fn on_start(&mut self, ctx: &mut impl Context<()>) {
        // The earliest requested deadline wins.
        ctx.wake_at(ctx.now() + Duration::from_secs(3600));
        ctx.wake_at(ctx.now() + Duration::from_millis(10));
    }
    fn on_tick(&mut self, ctx: &mut impl Context<()>, now: Instant) {
        self.ticks += 1;
        self.tx.send(self.ticks).unwrap();
        if self.ticks < 5 {
            ctx.wake_at(now + Duration::from_millis(5));
        }
    }
    fn on_accept(&mut self, _: &mut impl Context<()>, _: ConnId, _: SocketAddr) {}
    fn on_data(&mut self, _: &mut impl Context<()>, _: ConnId, _: &[u8]) {}
    fn on_closed(&mut self, _: &mut impl Context<()>, _: ConnId, _: Option<std::io::Error>) {}
    fn on_message(&mut self, _: &mut impl Context<()>, _: ()) {}
    fn on_adopt(&mut self, _: &mut impl Context<()>, _: ConnId, _: SocketAddr, _: Vec<u8>, _: ()) {}
}

#[test]
fn wake_at_ticks() {
    for mode in common::modes() {
        let (tx, rx) = mpsc::channel();
        let mut cfg = common::config(mode, 1);
        cfg.listen = None;
        let start = Instant::now();
        let rt = Runtime::start(cfg, move |_| Ticker {
            ticks: 0,
            tx: tx.clone(),
        })
        .unwrap();
        for i in 1..=5 {
            assert_eq!(rx.recv_timeout(T).unwrap(), i);
        }
        assert!(start.elapsed() >= Duration::from_millis(30));
        rt.shutdown();
        rt.join().unwrap();
        // No more ticks after the fifth.
        assert!(rx.try_recv().is_err());
    }
}

// ---------- set_reading ----------

#[derive(Default)]
struct Pauser {
    paused: Option<ConnId>,
    violations: Arc<AtomicUsize>,
}

impl Handler for Pauser {
    type Msg = ();
    fn on_accept(&mut self, _: &mut impl Context<()>, _: ConnId, _: SocketAddr) {}
    fn on_data(&mut self, ctx: &mut impl Context<()>, conn: ConnId, data: &[u8]) {
        if self.paused == Some(conn) {
            self.violations.fetch_add(1, Ordering::SeqCst);
        }
        if let Some(rest) = data.strip_prefix(b"PAUSE") {
            ctx.set_reading(conn, false);
            self.paused = Some(conn);
            ctx.wake_at(ctx.now() + Duration::from_millis(300));
            ctx.send(conn, rest);
        } else {
            ctx.send(conn, data);
        }
    }
    fn on_tick(&mut self, ctx: &mut impl Context<()>, _: Instant) {
        if let Some(c) = self.paused.take() {
            ctx.set_reading(c, true);
        }
    }
    fn on_closed(&mut self, _: &mut impl Context<()>, _: ConnId, _: Option<std::io::Error>) {}
    fn on_message(&mut self, _: &mut impl Context<()>, _: ()) {}
    fn on_adopt(&mut self, _: &mut impl Context<()>, _: ConnId, _: SocketAddr, _: Vec<u8>, _: ()) {}
}

#[test]
fn set_reading_pauses_on_data() {
    set_reading_run(16 * 1024, false);
}

#[test]
fn set_reading_tiny_buffers_and_eof_while_paused() {
    // Tiny buffers: completions that were already in flight when reading was paused must be
    // held back (stashed) and delivered, in order, after resuming; EOF while paused is
    // reported only after that data.
    set_reading_run(16, true);
}

fn set_reading_run(buf_size: usize, eof: bool) {
    for mode in common::modes() {
        let violations = Arc::new(AtomicUsize::new(0));
        let v = violations.clone();
        let mut cfg = common::config(mode, 1);
        cfg.buf_size = buf_size;
        let rt = Runtime::start(cfg, move |_| Pauser {
            paused: None,
            violations: v.clone(),
        })
        .unwrap();
        let mut s = common::connect(rt.local_addr().unwrap());
        let payload = common::pattern(0, 300_000);
        let mut first = b"PAUSE".to_vec();
        first.extend_from_slice(&payload[..1000]);
        common::write_all(&mut s, &first);
        let mut r = s.try_clone().unwrap();
        let rest = payload[1000..].to_vec();
        let w = std::thread::spawn(move || {
            for chunk in rest.chunks(7000) {
                s.write_all(chunk).unwrap();
            }
            if eof {
                s.shutdown(std::net::Shutdown::Write).unwrap();
            }
            s
        });
        let got = if eof {
            common::read_to_eof(&mut r)
        } else {
            common::read_exact(&mut r, payload.len())
        };
        let _s = w.join().unwrap();
        assert!(
            got == payload,
            "{mode:?}: echo mismatch ({} bytes)",
            got.len()
        );
        assert_eq!(
            violations.load(Ordering::SeqCst),
            0,
            "{mode:?}: on_data while paused"
        );
        rt.shutdown();
        rt.join().unwrap();
    }
}

// ---------- close flushes, abort, shutdown ----------

struct Closer {
    size: usize,
}

impl Handler for Closer {
    type Msg = ();
    fn on_accept(&mut self, ctx: &mut impl Context<()>, conn: ConnId, peer: SocketAddr) {
        assert_eq!(ctx.peer_addr(conn), Some(peer));
        if self.size == 0 {
            ctx.send(conn, b"never seen");
            ctx.abort(conn);
            assert_eq!(ctx.send(conn, b"x"), 0);
            return;
        }
        ctx.send(conn, &common::pattern(0, self.size));
        ctx.close(conn);
        assert!(!ctx.is_backpressured(conn));
        assert_eq!(ctx.send(conn, b"after close"), 0);
    }
    fn on_data(&mut self, _: &mut impl Context<()>, _: ConnId, _: &[u8]) {}
    fn on_closed(&mut self, _: &mut impl Context<()>, _: ConnId, _: Option<std::io::Error>) {
        panic!("on_closed must not be called for conns closed by the handler");
    }
    fn on_message(&mut self, _: &mut impl Context<()>, _: ()) {}
    fn on_adopt(&mut self, _: &mut impl Context<()>, _: ConnId, _: SocketAddr, _: Vec<u8>, _: ()) {}
}

#[test]
fn close_flushes_queued_output() {
    for mode in common::modes() {
        let size = 5 * 1024 * 1024 + 17;
        let rt = Runtime::start(common::config(mode, 1), move |_| Closer { size }).unwrap();
        let mut s = common::connect(rt.local_addr().unwrap());
        let got = common::read_to_eof(&mut s);
        assert_eq!(got.len(), size, "{mode:?}");
        assert!(got == common::pattern(0, size));
        rt.shutdown();
        rt.join().unwrap();
    }
}

#[test]
fn abort_drops_output() {
    for mode in common::modes() {
        let rt = Runtime::start(common::config(mode, 1), |_| Closer { size: 0 }).unwrap();
        let mut s = common::connect(rt.local_addr().unwrap());
        assert_eq!(common::read_to_eof(&mut s), b"");
        rt.shutdown();
        rt.join().unwrap();
    }
}

/// Abort while a large send is in flight (peer not reading): the send is cancelled and the
/// slot is released.
struct AbortLater {
    conns: Vec<ConnId>,
    data: Arc<Vec<u8>>,
}

impl Handler for AbortLater {
    type Msg = CountMsg;
    fn on_accept(&mut self, ctx: &mut impl Context<CountMsg>, conn: ConnId, _: SocketAddr) {
        ctx.send(conn, &self.data);
        self.conns.push(conn);
        // Late enough for the first (partial) send to complete and the next to be in flight.
        ctx.wake_at(Instant::now() + Duration::from_millis(150));
    }
    fn on_tick(&mut self, ctx: &mut impl Context<CountMsg>, _: Instant) {
        for c in self.conns.drain(..) {
            ctx.abort(c);
        }
    }
    fn on_data(&mut self, _: &mut impl Context<CountMsg>, _: ConnId, _: &[u8]) {}
    fn on_closed(&mut self, _: &mut impl Context<CountMsg>, _: ConnId, _: Option<std::io::Error>) {
        panic!("no on_closed for aborted conns");
    }
    fn on_message(&mut self, ctx: &mut impl Context<CountMsg>, msg: CountMsg) {
        let CountMsg::Count(tx) = msg;
        let _ = tx.send(ctx.conn_count());
    }
    fn on_adopt(
        &mut self,
        _: &mut impl Context<CountMsg>,
        _: ConnId,
        _: SocketAddr,
        _: Vec<u8>,
        _: CountMsg,
    ) {
    }
}

#[test]
fn abort_with_send_in_flight() {
    for mode in common::modes() {
        let data = Arc::new(common::pattern(0, 16 * 1024 * 1024));
        let rt = Runtime::start(common::config(mode, 1), move |_| AbortLater {
            conns: vec![],
            data: data.clone(),
        })
        .unwrap();
        let remote = rt.remote();
        let mut s = common::connect(rt.local_addr().unwrap());
        std::thread::sleep(Duration::from_millis(300));
        let got = common::read_to_eof(&mut s);
        assert!(
            got.len() < 16 * 1024 * 1024,
            "{mode:?}: output should have been dropped"
        );
        assert!(got == common::pattern(0, got.len()));
        let deadline = Instant::now() + T;
        while total_conns(&remote) != 0 {
            assert!(Instant::now() < deadline);
            std::thread::sleep(Duration::from_millis(10));
        }
        rt.shutdown();
        rt.join().unwrap();
    }
}

struct Greeter {
    shutdowns: Arc<AtomicUsize>,
}

impl Handler for Greeter {
    type Msg = ();
    fn on_accept(&mut self, ctx: &mut impl Context<()>, conn: ConnId, _: SocketAddr) {
        ctx.send(conn, b"hi");
    }
    fn on_data(&mut self, _: &mut impl Context<()>, _: ConnId, _: &[u8]) {}
    fn on_closed(&mut self, _: &mut impl Context<()>, _: ConnId, _: Option<std::io::Error>) {}
    fn on_shutdown(&mut self, ctx: &mut impl Context<()>) {
        self.shutdowns.fetch_add(1, Ordering::SeqCst);
        let _ = ctx.conn_count();
    }
    fn on_message(&mut self, _: &mut impl Context<()>, _: ()) {}
    fn on_adopt(&mut self, _: &mut impl Context<()>, _: ConnId, _: SocketAddr, _: Vec<u8>, _: ()) {}
}

#[test]
fn shutdown_joins_with_open_connections() {
    for mode in common::modes() {
        let n = Arc::new(AtomicUsize::new(0));
        let n2 = n.clone();
        let rt = Runtime::start(common::config(mode, 2), move |_| Greeter {
            shutdowns: n2.clone(),
        })
        .unwrap();
        let addr = rt.local_addr().unwrap();
        let mut clients: Vec<_> = (0..50).map(|_| common::connect(addr)).collect();
        for c in &mut clients {
            assert_eq!(common::read_exact(c, 2), b"hi");
        }
        let stopper = {
            let remote = rt.remote();
            std::thread::spawn(move || remote.stop())
        };
        stopper.join().unwrap();
        let start = Instant::now();
        rt.join().unwrap();
        assert!(start.elapsed() < Duration::from_secs(5));
        assert_eq!(n.load(Ordering::SeqCst), 2);
        for c in &mut clients {
            assert_eq!(common::read_to_eof(c), b"");
        }
        // Listener is gone.
        assert!(std::net::TcpStream::connect(addr).is_err());
    }
}

// ---------- slab accounting ----------

enum CountMsg {
    Count(mpsc::Sender<usize>),
}

struct Counter;

impl Handler for Counter {
    type Msg = CountMsg;
    fn on_accept(&mut self, _: &mut impl Context<CountMsg>, _: ConnId, _: SocketAddr) {}
    fn on_data(&mut self, ctx: &mut impl Context<CountMsg>, conn: ConnId, data: &[u8]) {
        ctx.send(conn, data);
    }
    fn on_closed(&mut self, _: &mut impl Context<CountMsg>, _: ConnId, _: Option<std::io::Error>) {}
    fn on_message(&mut self, ctx: &mut impl Context<CountMsg>, msg: CountMsg) {
        let CountMsg::Count(tx) = msg;
        let _ = tx.send(ctx.conn_count());
    }
    fn on_adopt(
        &mut self,
        _: &mut impl Context<CountMsg>,
        _: ConnId,
        _: SocketAddr,
        _: Vec<u8>,
        _: CountMsg,
    ) {
    }
}

fn total_conns(remote: &shards::Remote<CountMsg>) -> usize {
    (0..remote.shards())
        .map(|i| {
            let (tx, rx) = mpsc::channel();
            assert!(remote.send(i, CountMsg::Count(tx)));
            rx.recv_timeout(T).unwrap()
        })
        .sum()
}

#[test]
fn thousand_conns_leave_slab_empty() {
    for mode in common::modes() {
        let rt = Runtime::start(common::config(mode, 2), |_| Counter).unwrap();
        let addr = rt.local_addr().unwrap();
        let remote = rt.remote();
        for batch in 0..10 {
            let mut v: Vec<_> = (0..100).map(|_| common::connect(addr)).collect();
            for (i, c) in v.iter_mut().enumerate() {
                if (i + batch) % 2 == 0 {
                    common::write_all(c, b"ping");
                    assert_eq!(common::read_exact(c, 4), b"ping");
                }
            }
            if batch == 0 {
                assert!(total_conns(&remote) >= 100);
            }
        }
        let deadline = Instant::now() + T;
        loop {
            let n = total_conns(&remote);
            if n == 0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{mode:?}: {n} conns still in the slab"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        rt.shutdown();
        rt.join().unwrap();
    }
}

// ---------- panics ----------

struct Bomb;

impl Handler for Bomb {
    type Msg = ();
    fn on_accept(&mut self, _: &mut impl Context<()>, _: ConnId, _: SocketAddr) {}
    fn on_data(&mut self, ctx: &mut impl Context<()>, conn: ConnId, data: &[u8]) {
        if data.starts_with(b"PANIC") {
            panic!("boom on shard {}", ctx.shard());
        }
        ctx.send(conn, data);
    }
    fn on_closed(&mut self, _: &mut impl Context<()>, _: ConnId, _: Option<std::io::Error>) {}
    fn on_message(&mut self, _: &mut impl Context<()>, _: ()) {}
    fn on_adopt(&mut self, _: &mut impl Context<()>, _: ConnId, _: SocketAddr, _: Vec<u8>, _: ()) {}
}

#[test]
fn panicking_shard_surfaces_from_join_and_stops_others() {
    for mode in common::modes() {
        let rt = Runtime::start(common::config(mode, 2), |_| Bomb).unwrap();
        let mut s = common::connect(rt.local_addr().unwrap());
        common::write_all(&mut s, b"PANIC");
        let err = rt.join().expect_err("join must report the panic");
        assert!(err.to_string().contains("panicked"), "{err}");
    }
}

// ---------- config / helpers ----------

#[test]
fn cpu_lists_and_modes() {
    assert_eq!(parse_cpu_list("0,2-3").unwrap(), vec![0, 2, 3]);
    assert_eq!(parse_cpu_list(" 3, 1-2 ,1").unwrap(), vec![1, 2, 3]);
    assert!(parse_cpu_list("").is_err());
    assert!(parse_cpu_list("1,,2").is_err());
    assert!(parse_cpu_list("3-1").unwrap_err().contains("reversed"));
    assert!(parse_cpu_list("a")
        .unwrap_err()
        .contains("invalid CPU number"));
    assert_eq!("auto".parse::<IoMode>().unwrap(), IoMode::Auto);
    assert_eq!("uring".parse::<IoMode>().unwrap(), IoMode::Uring);
    assert_eq!("epoll".parse::<IoMode>().unwrap(), IoMode::Epoll);
    assert!("kqueue".parse::<IoMode>().is_err());
    assert_eq!(Backend::Uring.to_string(), "io_uring");
    assert_eq!(Backend::Epoll.to_string(), "epoll");
    assert!(!shards::allowed_cpus().unwrap().is_empty());
}

#[test]
fn confining_a_thread_is_inherited_by_the_threads_it_spawns() {
    let all = shards::allowed_cpus().unwrap();
    let last = *all.last().unwrap();
    // On a thread of its own, so the test harness's threads keep their mask.
    let seen = std::thread::spawn(move || {
        shards::confine_current_thread(&[last]).unwrap();
        let mine = shards::allowed_cpus().unwrap();
        let child = std::thread::spawn(|| shards::allowed_cpus().unwrap())
            .join()
            .unwrap();
        (mine, child)
    })
    .join()
    .unwrap();
    assert_eq!(seen, (vec![last], vec![last]));
    // This thread is untouched; bad input is an error, not a panic.
    assert_eq!(shards::allowed_cpus().unwrap(), all);
    assert!(shards::confine_current_thread(&[]).is_err());
    assert!(shards::confine_current_thread(&[1 << 20]).is_err());
    assert_eq!(shards::allowed_cpus().unwrap(), all);
}

#[test]
fn bad_configs_are_rejected() {
    let mut cfg = common::config(IoMode::Epoll, 2);
    cfg.cpus = vec![None];
    assert!(Runtime::start(cfg, |_| Counter).is_err());
    let mut cfg = common::config(IoMode::Epoll, 1);
    cfg.bufs_per_shard = 3;
    assert!(Runtime::start(cfg, |_| Counter).is_err());
    let mut cfg = common::config(IoMode::Epoll, 0);
    cfg.cpus = vec![];
    assert!(Runtime::start(cfg, |_| Counter).is_err());
}

#[test]
fn auto_mode_and_pinning() {
    let cpus = shards::allowed_cpus().unwrap();
    let mut cfg = common::config(IoMode::Auto, cpus.len().min(2));
    cfg.cpus = cpus.iter().take(cfg.shards).map(|&c| Some(c)).collect();
    let rt = Runtime::start(cfg, |_| Counter).unwrap();
    let expected = if shards::probe_uring().is_ok() {
        Backend::Uring
    } else {
        Backend::Epoll
    };
    assert_eq!(rt.backend(), expected);
    let mut s = common::connect(rt.local_addr().unwrap());
    common::write_all(&mut s, b"pinned");
    assert_eq!(common::read_exact(&mut s, 6), b"pinned");
    // Dropping the runtime stops and joins it.
    drop(rt);
}

#[test]
fn peer_eof_and_reset_report_on_closed() {
    struct Report(mpsc::Sender<bool>, HashMap<ConnId, ()>);
    impl Handler for Report {
        type Msg = ();
        fn on_accept(&mut self, _: &mut impl Context<()>, conn: ConnId, _: SocketAddr) {
            self.1.insert(conn, ());
        }
        fn on_data(&mut self, _: &mut impl Context<()>, _: ConnId, _: &[u8]) {}
        fn on_closed(
            &mut self,
            _: &mut impl Context<()>,
            conn: ConnId,
            err: Option<std::io::Error>,
        ) {
            assert!(self.1.remove(&conn).is_some());
            self.0.send(err.is_none()).unwrap();
        }
        fn on_message(&mut self, _: &mut impl Context<()>, _: ()) {}
        fn on_adopt(
            &mut self,
            _: &mut impl Context<()>,
            _: ConnId,
            _: SocketAddr,
            _: Vec<u8>,
            _: (),
        ) {
        }
    }
    for mode in common::modes() {
        let (tx, rx) = mpsc::channel();
        let rt = Runtime::start(common::config(mode, 1), move |_| {
            Report(tx.clone(), HashMap::new())
        })
        .unwrap();
        let s = common::connect(rt.local_addr().unwrap());
        drop(s);
        assert!(rx.recv_timeout(T).unwrap(), "{mode:?}: clean EOF expected");
        rt.shutdown();
        rt.join().unwrap();
    }
}
