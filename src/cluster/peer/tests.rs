//! Links over real sockets on 127.0.0.1, with bounded waits.

use super::*;
use crossbeam_channel::{Receiver, RecvTimeoutError};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::{Barrier, OnceLock};

const SECRET: &[u8] = b"a shared cluster secret, 32 bytes";
const WAIT: Duration = Duration::from_secs(10);

fn any_port() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// A started node whose received messages arrive on `rx`; `reply` makes it answer each
/// Migrate with Ready (through its own `Peers`, from `on_msg`, as a node would).
struct Node {
    peers: Peers,
    rx: Receiver<(String, PeerMsg)>,
}

fn node(id: &str, secret: &[u8], reply: bool) -> Node {
    let (tx, rx) = crossbeam_channel::unbounded();
    let me: Arc<OnceLock<Peers>> = Arc::new(OnceLock::new());
    let me2 = me.clone();
    let on_msg: OnMsg = Arc::new(move |from: &str, m: PeerMsg| {
        if reply {
            if let PeerMsg::Migrate { sid, epoch, .. } = &m {
                if let Some(p) = me2.get() {
                    // The address is not needed: the link is up.
                    assert!(p.send(
                        from,
                        any_port(),
                        PeerMsg::Ready {
                            sid: *sid,
                            epoch: *epoch
                        }
                    ));
                }
            }
        }
        let _ = tx.send((from.to_string(), m));
    });
    let auth = PeerAuth::from_secret(secret).unwrap();
    let peers = Peers::start(any_port(), id.to_string(), auth, on_msg).unwrap();
    assert!(me.set(peers.clone()).is_ok());
    Node { peers, rx }
}

fn migrate(sid: u32, from: &str, record: Vec<u8>) -> PeerMsg {
    PeerMsg::Migrate {
        sid,
        epoch: u64::from(sid) * 10,
        from: from.to_string(),
        record,
        state: b"agent state".to_vec(),
        caps_hint: 3,
    }
}

fn recv(n: &Node) -> (String, PeerMsg) {
    match n.rx.recv_timeout(WAIT) {
        Ok(x) => x,
        Err(RecvTimeoutError::Timeout) => panic!("nothing arrived in {WAIT:?}"),
        Err(e) => panic!("{e}"),
    }
}

/// Waits (bounded) until `f` holds.
fn eventually(what: &str, f: impl Fn() -> bool) {
    let until = Instant::now() + WAIT;
    while !f() {
        assert!(Instant::now() < until, "not within {WAIT:?}: {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn simultaneous_sends_settle_on_one_link_and_lose_nothing() {
    // Several rounds: the race between the two connects goes differently each time.
    for round in 0..4 {
        let a = node("node-a", SECRET, true);
        let b = node("node-b", SECRET, true);
        let (aa, ba) = (a.peers.local_addr(), b.peers.local_addr());
        const N: u32 = 50;
        let go = Barrier::new(2);
        std::thread::scope(|s| {
            s.spawn(|| {
                go.wait();
                for i in 0..N {
                    assert!(a
                        .peers
                        .send("node-b", ba, migrate(i, "node-a", vec![1; 100])));
                }
            });
            s.spawn(|| {
                go.wait();
                for i in 0..N {
                    assert!(b
                        .peers
                        .send("node-a", aa, migrate(1000 + i, "node-b", vec![2; 100])));
                }
            });
        });
        // Each side gets N Migrates (in order) and N Readys for its own.
        for (me, other, base) in [(&a, "node-b", 1000), (&b, "node-a", 0)] {
            let mut migrates = Vec::new();
            let mut readys = Vec::new();
            while migrates.len() < N as usize || readys.len() < N as usize {
                match recv(me) {
                    (from, PeerMsg::Migrate { sid, .. }) => {
                        assert_eq!(from, other);
                        migrates.push(sid);
                    }
                    (from, PeerMsg::Ready { sid, .. }) => {
                        assert_eq!(from, other);
                        readys.push(sid);
                    }
                    other => panic!("round {round}: unexpected {other:?}"),
                }
            }
            migrates.sort_unstable();
            readys.sort_unstable();
            assert_eq!(
                migrates,
                (base..base + N).collect::<Vec<_>>(),
                "round {round}"
            );
            let own = if base == 0 { 1000 } else { 0 };
            assert_eq!(readys, (own..own + N).collect::<Vec<_>>(), "round {round}");
        }
        // One link per side: the duplicate is closed (the switch may still be under way).
        eventually("one link up and one link thread per side", || {
            a.peers.links() == vec![("node-b".to_string(), true)]
                && b.peers.links() == vec![("node-a".to_string(), true)]
                && a.peers.live_threads() == 1
                && b.peers.live_threads() == 1
        });
        // And it still carries both ways.
        assert!(a
            .peers
            .send("node-b", ba, PeerMsg::Commit { sid: 7, epoch: 70 }));
        assert!(b
            .peers
            .send("node-a", aa, PeerMsg::Abort { sid: 8, epoch: 80 }));
        assert_eq!(recv(&b).1, PeerMsg::Commit { sid: 7, epoch: 70 });
        assert_eq!(recv(&a).1, PeerMsg::Abort { sid: 8, epoch: 80 });
        a.peers.shutdown();
        b.peers.shutdown();
        assert_eq!(a.peers.live_threads(), 0);
        assert_eq!(b.peers.live_threads(), 0);
    }
}

#[test]
fn a_ten_mib_migrate_arrives_intact_and_messages_keep_order() {
    let a = node("a", SECRET, false);
    let b = node("b", SECRET, false);
    let record: Vec<u8> = (0..10 << 20)
        .map(|i: u32| (i * 7 + i / 4099) as u8)
        .collect();
    let big = migrate(42, "a", record);
    assert!(a.peers.send("b", b.peers.local_addr(), big.clone()));
    // 1,000 in order right behind it, then a reply the other way.
    for i in 0..1000u64 {
        assert!(a.peers.send(
            "b",
            b.peers.local_addr(),
            PeerMsg::RelayData {
                stream: i,
                bytes: i.to_be_bytes().to_vec()
            }
        ));
    }
    let (from, got) = recv(&b);
    assert_eq!(from, "a");
    assert!(got == big, "the 10 MiB record changed on the way");
    for i in 0..1000u64 {
        assert_eq!(
            recv(&b).1,
            PeerMsg::RelayData {
                stream: i,
                bytes: i.to_be_bytes().to_vec()
            }
        );
    }
    assert!(b.peers.send(
        "a",
        a.peers.local_addr(),
        PeerMsg::Ready {
            sid: 42,
            epoch: 420
        }
    ));
    assert_eq!(
        recv(&a),
        (
            "b".into(),
            PeerMsg::Ready {
                sid: 42,
                epoch: 420
            }
        )
    );
    a.peers.shutdown();
    b.peers.shutdown();
}

#[test]
fn a_burst_of_ten_thousand_small_messages_is_fast() {
    let a = node("a", SECRET, false);
    let b = node("b", SECRET, false);
    let to = b.peers.local_addr();
    // Link up first.
    assert!(a.peers.send("b", to, PeerMsg::Ping { nonce: 0 }));
    assert!(a.peers.send("b", to, PeerMsg::Commit { sid: 0, epoch: 0 }));
    assert_eq!(recv(&b).1, PeerMsg::Commit { sid: 0, epoch: 0 });
    let t = Instant::now();
    for i in 0..10_000u32 {
        assert!(a.peers.send("b", to, PeerMsg::Ready { sid: i, epoch: 1 }));
    }
    for i in 0..10_000u32 {
        assert_eq!(recv(&b).1, PeerMsg::Ready { sid: i, epoch: 1 });
    }
    let took = t.elapsed();
    eprintln!("10,000 messages over the peer link: {took:?}");
    assert!(took < Duration::from_secs(1), "{took:?}");
    a.peers.shutdown();
    b.peers.shutdown();
}

#[test]
fn another_secret_gets_nothing_through_and_the_good_link_is_unaffected() {
    let a = node("a", SECRET, false);
    let b = node("b", SECRET, false);
    let evil = node("evil", b"some other cluster's secret!!", false);
    assert!(a.peers.send(
        "b",
        b.peers.local_addr(),
        PeerMsg::Commit { sid: 1, epoch: 1 }
    ));
    assert_eq!(recv(&b).1, PeerMsg::Commit { sid: 1, epoch: 1 });

    // Both directions: the outsider dials a member, a member dials the outsider.
    assert!(evil
        .peers
        .send("a", a.peers.local_addr(), migrate(9, "evil", vec![6; 10])));
    assert!(a.peers.send(
        "evil",
        evil.peers.local_addr(),
        PeerMsg::Abort { sid: 9, epoch: 9 }
    ));
    eventually("both attempts fail", || {
        evil.peers.links() == vec![("a".to_string(), false)]
            && a.peers.links().contains(&("evil".to_string(), false))
            && evil.peers.live_threads() == 0
    });
    // Failed within the retry window: known dead.
    assert!(!a
        .peers
        .send("evil", evil.peers.local_addr(), PeerMsg::Ping { nonce: 1 }));

    assert!(a.peers.send(
        "b",
        b.peers.local_addr(),
        PeerMsg::Commit { sid: 2, epoch: 2 }
    ));
    assert!(b.peers.send(
        "a",
        a.peers.local_addr(),
        PeerMsg::Ready { sid: 3, epoch: 3 }
    ));
    assert_eq!(recv(&b).1, PeerMsg::Commit { sid: 2, epoch: 2 });
    assert_eq!(recv(&a).1, PeerMsg::Ready { sid: 3, epoch: 3 });
    std::thread::sleep(Duration::from_millis(100));
    assert!(a.rx.is_empty() && b.rx.is_empty() && evil.rx.is_empty());
    assert!(a.peers.links().contains(&("b".to_string(), true)));
    for n in [&a, &b, &evil] {
        n.peers.shutdown();
    }
}

#[test]
fn a_hello_with_our_own_id_is_refused() {
    let a = node("twin", SECRET, false);
    let b = node("twin", SECRET, false);
    // Sending to oneself is refused outright.
    assert!(!a
        .peers
        .send("twin", b.peers.local_addr(), PeerMsg::Ping { nonce: 1 }));
    let c = node("c", SECRET, false);
    // `c` believes "x" is at b's address; b says it is "twin": refused too.
    assert!(c
        .peers
        .send("x", b.peers.local_addr(), PeerMsg::Ping { nonce: 1 }));
    eventually("the attempt fails", || {
        c.peers.links() == vec![("x".to_string(), false)] && c.peers.live_threads() == 0
    });
    std::thread::sleep(Duration::from_millis(50));
    assert!(a.rx.is_empty() && b.rx.is_empty() && c.rx.is_empty());
    for n in [&a, &b, &c] {
        n.peers.shutdown();
    }
}

#[test]
fn garbage_plaintext_and_silent_clients_are_closed_in_time() {
    let a = node("a", SECRET, false);
    let b = node("b", SECRET, false);
    let addr = a.peers.local_addr();
    // Read until the server closes; how long it took.
    let closed_after = |payload: &'static [u8]| {
        std::thread::spawn(move || {
            let t = Instant::now();
            let mut s = TcpStream::connect(addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(8))).unwrap();
            let _ = s.write_all(payload);
            let mut buf = [0u8; 4096];
            loop {
                match s.read(&mut buf) {
                    Ok(0) => return t.elapsed(),
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                        return t.elapsed()
                    }
                    Err(e) => panic!("still open after {:?}: {e}", t.elapsed()),
                }
            }
        })
    };
    let garbage = closed_after(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    // A well-formed HELLO frame, but no TLS.
    let plain = closed_after(b"\0\0\0\x06\x01\x01\0\x02ab");
    let silent = closed_after(b"");
    let half = closed_after(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03");
    // Meanwhile the good link works.
    assert!(b.peers.send("a", addr, PeerMsg::Ready { sid: 1, epoch: 1 }));
    assert_eq!(recv(&a).1, PeerMsg::Ready { sid: 1, epoch: 1 });

    let g = garbage.join().unwrap();
    let p = plain.join().unwrap();
    assert!(g < Duration::from_secs(1), "garbage: {g:?}");
    assert!(p < Duration::from_secs(1), "plaintext: {p:?}");
    for (what, h) in [("silent", silent), ("half a ClientHello", half)] {
        let took = h.join().unwrap();
        assert!(
            took >= Duration::from_millis(4500) && took < Duration::from_millis(6500),
            "{what}: {took:?}"
        );
    }
    assert!(a.rx.is_empty());
    assert!(b.peers.send("a", addr, PeerMsg::Ready { sid: 2, epoch: 2 }));
    assert_eq!(recv(&a).1, PeerMsg::Ready { sid: 2, epoch: 2 });
    a.peers.shutdown();
    b.peers.shutdown();
}

#[test]
fn a_dead_node_is_retried_at_most_every_500_ms_and_a_restarted_one_is_found() {
    let a = node("a", SECRET, false);
    let b = node("b", SECRET, false);
    let old = b.peers.local_addr();
    let first = Instant::now();
    assert!(a.peers.send("b", old, PeerMsg::Commit { sid: 1, epoch: 1 }));
    assert_eq!(recv(&b).1, PeerMsg::Commit { sid: 1, epoch: 1 });
    b.peers.shutdown();
    eventually("the link goes down", || {
        a.peers.links() == vec![("b".to_string(), false)]
    });
    // Within 500 ms of the last attempt, a dead node is not dialled again.
    if first.elapsed() < Duration::from_millis(400) {
        assert!(!a.peers.send("b", old, PeerMsg::Commit { sid: 9, epoch: 9 }));
    }
    std::thread::sleep(RETRY_EVERY.saturating_sub(first.elapsed()) + Duration::from_millis(20));
    // Nobody listens there now: the attempt fails, then sends are refused for a while.
    let t = Instant::now();
    assert!(a.peers.send("b", old, PeerMsg::Commit { sid: 2, epoch: 2 }));
    eventually("the connect fails", || a.peers.live_threads() == 0);
    if t.elapsed() < Duration::from_millis(400) {
        assert!(!a.peers.send("b", old, PeerMsg::Commit { sid: 3, epoch: 3 }));
    }
    // "b" comes back elsewhere.
    let b2 = node("b", SECRET, false);
    std::thread::sleep(RETRY_EVERY.saturating_sub(t.elapsed()) + Duration::from_millis(20));
    assert!(a.peers.send(
        "b",
        b2.peers.local_addr(),
        PeerMsg::Commit { sid: 4, epoch: 4 }
    ));
    assert_eq!(recv(&b2).1, PeerMsg::Commit { sid: 4, epoch: 4 });
    assert_eq!(a.peers.links(), vec![("b".to_string(), true)]);
    a.peers.shutdown();
    b2.peers.shutdown();
    // After shutdown nothing is accepted.
    assert!(!a
        .peers
        .send("b", b2.peers.local_addr(), PeerMsg::Ping { nonce: 0 }));
}

#[test]
fn bad_node_ids_are_refused_at_start() {
    let auth = PeerAuth::from_secret(SECRET).unwrap();
    let on_msg: OnMsg = Arc::new(|_: &str, _: PeerMsg| {});
    assert!(Peers::start(any_port(), String::new(), auth.clone(), on_msg.clone()).is_err());
    assert!(Peers::start(any_port(), "n".repeat(256), auth, on_msg).is_err());
}

#[test]
fn at_most_256_connections_handshake_at_once() {
    let a = node("a", SECRET, false);
    let b = node("b", SECRET, false);
    let addr = a.peers.local_addr();
    assert!(b.peers.send("a", addr, PeerMsg::Ready { sid: 1, epoch: 1 }));
    assert_eq!(recv(&a).1, PeerMsg::Ready { sid: 1, epoch: 1 });
    let silent: Vec<TcpStream> = (0..MAX_HANDSHAKING)
        .map(|_| TcpStream::connect(addr).unwrap())
        .collect();
    eventually("all of them in their handshake", || {
        a.peers.inner.handshaking.load(Ordering::SeqCst) == MAX_HANDSHAKING
    });
    // One more is closed at once.
    let t = Instant::now();
    let mut extra = TcpStream::connect(addr).unwrap();
    extra
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    match extra.read(&mut [0u8; 16]) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("the 257th connection is still open: {other:?}"),
    }
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    // The link that is up does not notice.
    assert!(b.peers.send("a", addr, PeerMsg::Ready { sid: 2, epoch: 2 }));
    assert_eq!(recv(&a).1, PeerMsg::Ready { sid: 2, epoch: 2 });
    drop(silent);
    eventually("the silent ones are gone", || {
        a.peers.inner.handshaking.load(Ordering::SeqCst) == 0 && a.peers.live_threads() == 1
    });
    a.peers.shutdown();
    b.peers.shutdown();
}
