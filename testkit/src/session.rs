//! Helpers for tests of the client library (`clawterm_client::Session`).

use std::time::{Duration, Instant};

use clawterm_client::{Backoff, Event, Options, Session, Transport};

use super::Proxy;

/// Fast reconnects for tests: 20 ms → 300 ms.
pub fn fast_opts(transport: Transport) -> Options {
    Options {
        backoff: Backoff::new(Duration::from_millis(20), Duration::from_millis(300)),
        connect_timeout: Duration::from_secs(2),
        handshake_timeout: Duration::from_secs(3),
        transport,
        ..Options::default()
    }
}

/// Receives until `done(collected)` or the deadline; returns the collected data and the
/// non-data events. Panics after `within`.
pub fn collect_until(
    s: &mut Session,
    within: Duration,
    mut done: impl FnMut(&[u8]) -> bool,
) -> (Vec<u8>, Vec<Event>) {
    let deadline = Instant::now() + within;
    let mut data = Vec::new();
    let mut evs = Vec::new();
    while !done(&data) {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "timed out; got {:?}; events {evs:?}",
            String::from_utf8_lossy(&data)
        );
        match s.recv(left.min(Duration::from_millis(200))) {
            Ok(Some(Event::Data(d))) => data.extend_from_slice(&d),
            Ok(Some(e)) => evs.push(e),
            Ok(None) => {}
            Err(e) => panic!(
                "session failed: {e}; got {:?}",
                String::from_utf8_lossy(&data)
            ),
        }
    }
    (data, evs)
}

/// Receives until the server has acknowledged every byte sent; panics with "`what` never
/// acknowledged" after 5 s.
pub fn wait_acked(s: &mut Session, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while s.unacked_bytes() > 0 {
        assert!(Instant::now() < deadline, "{what} never acknowledged");
        let _ = s.recv(Duration::from_millis(50)).unwrap();
    }
}

/// Receives until the session reports the connection lost; panics after 5 s.
pub fn wait_disconnected(s: &mut Session) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        assert!(Instant::now() < deadline, "loss never noticed");
        if let Ok(Some(Event::Disconnected { .. })) = s.recv(Duration::from_millis(50)) {
            break;
        }
    }
}

/// Receives DATA until `want` bytes have come (within 60 s) while `proxy` is cut for 200 ms
/// at a time, at most `max_cuts` times: the first cut 150 ms in, the next ones 250 ms after
/// each restore. Returns (the data, the cuts made, the reconnects seen); panics on a GAP or a
/// failed session.
pub fn receive_through_cuts(
    s: &mut Session,
    proxy: &Proxy,
    want: usize,
    max_cuts: u32,
) -> (Vec<u8>, u32, u32) {
    let mut data = Vec::new();
    let (mut cuts, mut reconnects) = (0, 0);
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut next_cut = Instant::now() + Duration::from_millis(150);
    let mut restore_at: Option<Instant> = None;
    while data.len() < want {
        assert!(
            Instant::now() < deadline,
            "timed out after {cuts} cuts; got {} of {want} bytes",
            data.len(),
        );
        let now = Instant::now();
        if let Some(r) = restore_at {
            if now >= r {
                proxy.restore();
                restore_at = None;
                next_cut = now + Duration::from_millis(250);
            }
        } else if now >= next_cut && cuts < max_cuts {
            proxy.cut();
            cuts += 1;
            restore_at = Some(now + Duration::from_millis(200));
        }
        match s.recv(Duration::from_millis(20)) {
            Ok(Some(Event::Data(d))) => data.extend_from_slice(&d),
            Ok(Some(Event::Reconnected { .. })) => reconnects += 1,
            Ok(Some(Event::Gap)) => panic!("unexpected GAP"),
            Ok(_) => {}
            Err(e) => panic!("session failed: {e}"),
        }
    }
    (data, cuts, reconnects)
}
