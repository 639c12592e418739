//! Library-level tests of `clawterm_client` against real `clawtermd` and `claw-agent`
//! processes, with a TCP proxy the tests can cut and restore.

use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use clawterm_client::{
    Backoff, ClientError, Credentials, Event, Options, Session, Store, Transport,
};

use clawterm_testkit as harness;
use clawterm_testkit::client as client_support;
use client_support::*;
use harness::session::{
    collect_until, fast_opts, receive_through_cuts, wait_acked, wait_disconnected,
};

/// A session to (TENANT, AGENT) at `endpoint` with fast reconnects.
fn fast_session(endpoint: &str) -> Session {
    Session::connect_with(
        endpoint,
        TENANT,
        AGENT,
        TOKEN,
        fast_opts(Transport::Plaintext),
    )
    .unwrap()
}

// ---------------------------------------------------------------------------------------------
// Tests

#[test]
fn connect_and_echo() {
    let env = Env::start(&["echo"]);
    let mut s = Session::connect(&env.endpoint(), TENANT, AGENT, TOKEN).unwrap();
    assert_ne!(s.session_id(), 0);
    s.resize(100, 30).unwrap();
    s.send(b"hello clawterm").unwrap();
    let (d, _) = collect_until(&mut s, Duration::from_secs(5), |d| d.len() >= 14);
    assert_eq!(d, b"hello clawterm");
    // The server acknowledges what it received.
    wait_acked(&mut s, "input");
}

#[test]
fn refusals_are_typed_and_actionable() {
    let env = Env::start(&["echo"]);
    let e = Session::connect(&env.endpoint(), TENANT, AGENT, [0x11; 32]).unwrap_err();
    assert_eq!(e, ClientError::AuthFailed);
    assert_eq!(e.exit_code(), 4);
    assert!(e.to_string().contains("--token"), "{e}");

    let e = Session::connect(&env.endpoint(), TENANT, 99, TOKEN).unwrap_err();
    assert!(matches!(e, ClientError::NoAgent { .. }), "{e:?}");

    // A port nobody listens on.
    let free = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let e = Session::connect(&free.to_string(), TENANT, AGENT, TOKEN).unwrap_err();
    assert!(matches!(e, ClientError::Unreachable { .. }), "{e:?}");
    assert_eq!(e.exit_code(), 3);

    // A wrong resume token.
    let s = Session::connect(&env.endpoint(), TENANT, AGENT, TOKEN).unwrap();
    let mut c = s.credentials("x");
    c.resume_token[0] ^= 0xFF;
    let e = Session::resume(&c).unwrap_err();
    assert_eq!(e, ClientError::NoSuchSession);
    assert_eq!(e.exit_code(), 5);
    assert!(e.to_string().contains("clawterm connect"), "{e}");
}

#[test]
fn abrupt_loss_every_byte_exactly_once_in_order() {
    const N: usize = 400;
    let script = format!(
        "read x; i=1; while [ $i -le {N} ]; do echo L$i; i=$((i+1)); sleep 0.005; done; sleep 60"
    );
    let env = Env::start(&["exec", "--", "sh", "-c", &script]);
    let proxy = Proxy::start(env.addr);
    let mut s = fast_session(&proxy.endpoint());
    s.send(b"go\n").unwrap();
    let want: Vec<u8> = (1..=N)
        .flat_map(|i| format!("L{i}\n").into_bytes())
        .collect();
    let (data, cuts, reconnects) = receive_through_cuts(&mut s, &proxy, want.len(), 6);
    assert_eq!(
        String::from_utf8_lossy(&data),
        String::from_utf8_lossy(&want)
    );
    assert!(
        cuts >= 3,
        "the output finished before the proxy was cut enough ({cuts})"
    );
    assert!(reconnects >= 1, "never reconnected");
}

#[test]
fn reliable_resend_of_input_typed_while_down() {
    let env = Env::start(&["echo"]);
    let proxy = Proxy::start(env.addr);
    let mut s = fast_session(&proxy.endpoint());
    s.send(b"<before>").unwrap();
    collect_until(&mut s, Duration::from_secs(5), |d| contains(d, b"<before>"));

    proxy.cut();
    // Wait until the library notices.
    wait_disconnected(&mut s);
    s.send(b"<typed-1>").unwrap();
    s.send(b"<typed-2>").unwrap();
    // Still down for a while: failed attempts, nothing delivered.
    let t = Instant::now();
    while t.elapsed() < Duration::from_millis(300) {
        if let Some(Event::Data(d)) = s.recv(Duration::from_millis(50)).unwrap() {
            panic!("data while cut: {d:?}");
        }
    }
    assert!(s.unacked_bytes() >= 18);
    proxy.restore();
    let (d, _) = collect_until(&mut s, Duration::from_secs(10), |d| {
        contains(d, b"<typed-1><typed-2>") || contains(d, b"<typed-2>")
    });
    // Give any duplicate a chance to show up.
    let (more, _) = collect_until(&mut s, Duration::from_secs(2), {
        let t = Instant::now();
        move |_| t.elapsed() > Duration::from_millis(500)
    });
    let all = [d, more].concat();
    assert_eq!(
        count(&all, b"<typed-1>"),
        1,
        "{:?}",
        String::from_utf8_lossy(&all)
    );
    assert_eq!(
        count(&all, b"<typed-2>"),
        1,
        "{:?}",
        String::from_utf8_lossy(&all)
    );
    assert_eq!(
        count(&all, b"<before>"),
        0,
        "replayed twice: {:?}",
        String::from_utf8_lossy(&all)
    );
    assert!(contains(&all, b"<typed-1><typed-2>") || contains(&all, b"<typed-1>"));
    wait_acked(&mut s, "resent input");
}

#[test]
fn second_resume_takes_over() {
    let env = Env::start(&["echo"]);
    let mut a = Session::connect(&env.endpoint(), TENANT, AGENT, TOKEN).unwrap();
    a.send(b"one").unwrap();
    collect_until(&mut a, Duration::from_secs(5), |d| d == b"one");
    let creds = a.credentials("dev");
    let mut b = Session::resume(&creds).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let err = loop {
        assert!(Instant::now() < deadline, "first device never told");
        match a.recv(Duration::from_millis(100)) {
            Err(e) => break e,
            Ok(Some(Event::Data(d))) => panic!("unexpected data {d:?}"),
            Ok(_) => {}
        }
    };
    assert_eq!(err, ClientError::TakenOver);
    assert_eq!(err.exit_code(), 6);
    assert!(err.to_string().contains("taken over by another device"));
    // It stays down: no reconnect fight.
    assert_eq!(
        a.recv(Duration::from_millis(300)).unwrap_err(),
        ClientError::TakenOver
    );
    // The new device has the session, with nothing shown twice.
    b.send(b"two").unwrap();
    let (d, _) = collect_until(&mut b, Duration::from_secs(5), |d| d.len() >= 3);
    assert_eq!(d, b"two");
}

#[test]
fn detach_then_resume_shows_only_new_output() {
    let env = Env::start(&["echo"]);
    let mut a = Session::connect(&env.endpoint(), TENANT, AGENT, TOKEN).unwrap();
    a.send(b"first").unwrap();
    collect_until(&mut a, Duration::from_secs(5), |d| d == b"first");
    let creds = a.detach();
    let mut b = Session::resume(&creds).unwrap();
    b.send(b"second").unwrap();
    let (d, _) = collect_until(&mut b, Duration::from_secs(5), |d| d.len() >= 6);
    assert_eq!(d, b"second");
}

/// Calls `try_recv` every 5 ms for `d`; returns the longest call and the events seen.
fn spin(s: &mut Session, d: Duration) -> (Duration, Vec<Event>) {
    let end = Instant::now() + d;
    let mut longest = Duration::ZERO;
    let mut evs = Vec::new();
    while Instant::now() < end {
        let t = Instant::now();
        match s.try_recv() {
            Ok(Some(e)) => evs.push(e),
            Ok(None) => {}
            Err(e) => panic!("session failed: {e}"),
        }
        longest = longest.max(t.elapsed());
        std::thread::sleep(Duration::from_millis(5));
    }
    (longest, evs)
}

/// While the server cannot be reached, `try_recv` does not block: a reconnect's connect runs
/// on a helper thread and its handshake is driven without blocking. Default timeouts (connect
/// 5 s, handshake 10 s), fast backoff. Two black holes behind the proxy: (1) connections
/// accepted and never answered (RESUME waits for the handshake timeout), (2) no more accepts
/// and a full accept queue (TCP connects hang for the connect timeout). Each call returns in
/// well under a second (a blocking attempt takes 5-10 s), input is still taken, and after the
/// network is back the session resumes and delivers it.
#[test]
fn try_recv_never_blocks_while_the_server_is_unreachable() {
    let env = Env::start(&["echo"]);
    let proxy = Proxy::start_with_backlog(env.addr, 0);
    let opts = Options {
        backoff: Backoff::new(Duration::from_millis(20), Duration::from_millis(300)),
        ..Options::default()
    };
    assert_eq!(opts.connect_timeout, Duration::from_secs(5));
    assert_eq!(opts.handshake_timeout, Duration::from_secs(10));
    let mut s = Session::connect_with(&proxy.endpoint(), TENANT, AGENT, TOKEN, opts).unwrap();
    s.send(b"one").unwrap();
    collect_until(&mut s, Duration::from_secs(5), |d| d == b"one");

    // 1. Accepted, never answered.
    let before = proxy.accepted.load(std::sync::atomic::Ordering::SeqCst);
    proxy.black_hole();
    let (longest1, evs1) = spin(&mut s, Duration::from_secs(2));
    let reached = proxy.accepted.load(std::sync::atomic::Ordering::SeqCst) - before;
    s.send(b"two").unwrap();
    // 2. Nothing accepted, connects hang.
    proxy.restore();
    proxy.stall();
    let _queued = proxy.fill_queue();
    let (longest2, evs2) = spin(&mut s, Duration::from_secs(2));
    s.send(b"three").unwrap();
    println!(
        "longest try_recv: {longest1:?} (accepted, unanswered: {reached} connections), {longest2:?} (connects hanging)"
    );
    assert!(
        evs1.iter().any(|e| matches!(e, Event::Reconnecting { .. })),
        "no reconnect attempt: {evs1:?}"
    );
    assert!(reached >= 1, "no attempt reached the black hole");
    assert!(
        evs2.iter().any(|e| matches!(e, Event::Reconnecting { .. })),
        "no reconnect attempt: {evs2:?}"
    );
    assert!(!s.is_connected());
    assert!(
        longest1 < Duration::from_millis(500) && longest2 < Duration::from_millis(500),
        "try_recv blocked for {longest1:?} / {longest2:?}"
    );
    // Back: the input typed while down arrives, once, in order.
    drop(_queued);
    proxy.restore();
    let (d, _) = collect_until(&mut s, Duration::from_secs(30), |d| d.len() >= 8);
    assert_eq!(d, b"twothree");
}

/// `retry_now` (the CLI calls it when the user types while down) moves a far-off retry
/// forward, but never to less than a second after the previous attempt: called in a loop for
/// 3 s it makes at most 4 attempts; after the network is back it reconnects long before the
/// 20 s backoff would have.
#[test]
fn retry_now_is_prompt_but_rate_limited() {
    use std::sync::atomic::Ordering::SeqCst;
    let env = Env::start(&["echo"]);
    let proxy = Proxy::start(env.addr);
    let opts = Options {
        backoff: Backoff::new(Duration::from_secs(20), Duration::from_secs(20)),
        ..Options::default()
    };
    let mut s = Session::connect_with(&proxy.endpoint(), TENANT, AGENT, TOKEN, opts).unwrap();
    s.send(b"a").unwrap();
    collect_until(&mut s, Duration::from_secs(5), |d| d == b"a");
    proxy.cut();
    let before = proxy.accepted.load(SeqCst);
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(3) {
        let _ = s.try_recv().unwrap();
        s.retry_now();
        std::thread::sleep(Duration::from_millis(5));
    }
    let attempts = proxy.accepted.load(SeqCst) - before;
    println!("attempts in 3 s of retry_now: {attempts}");
    assert!(
        (1..=4).contains(&attempts),
        "{attempts} attempts in 3 s (backoff 20 s)"
    );
    proxy.restore();
    s.send(b"b").unwrap();
    let t = Instant::now();
    let deadline = t + Duration::from_secs(10);
    let mut data = Vec::new();
    while data != b"b" {
        assert!(Instant::now() < deadline, "not reconnected within 10 s");
        s.retry_now();
        if let Some(Event::Data(d)) = s.recv(Duration::from_millis(20)).unwrap() {
            data.extend_from_slice(&d);
        }
    }
    println!("reconnected {:?} after the restore", t.elapsed());
}

#[test]
fn backoff_bounds() {
    let base = Duration::from_millis(100);
    let cap = Duration::from_secs(10);
    let mut b = Backoff::new(base, cap);
    let mut ceilings = Vec::new();
    for attempt in 0..40u32 {
        let ceil = b.ceiling();
        ceilings.push(ceil);
        let want = (base * 2u32.saturating_pow(attempt.min(20))).min(cap);
        assert_eq!(ceil, want, "attempt {attempt}");
        let lo = b.clone().next_with(0.0);
        let hi = b.clone().next_with(1.0);
        assert_eq!(lo, base, "never below base");
        assert_eq!(hi, ceil, "the window's top");
        for _ in 0..50 {
            let d = b.clone().next_delay();
            assert!(
                d >= base && d <= ceil && d <= cap,
                "{d:?} outside [{base:?}, {ceil:?}]"
            );
        }
        b.next_delay();
    }
    // The window grows until the cap, then stays there.
    assert!(ceilings.windows(2).all(|w| w[1] >= w[0]));
    assert_eq!(ceilings[0], base);
    assert_eq!(ceilings[1], base * 2);
    assert_eq!(*ceilings.last().unwrap(), cap);
    // Out-of-range draws are clamped, never a tight loop.
    assert_eq!(Backoff::new(base, cap).next_with(-5.0), base);
    assert_eq!(Backoff::new(base, cap).next_with(f64::NAN), base);
    assert!(Backoff::new(Duration::ZERO, Duration::ZERO).next_delay() >= Duration::from_millis(1));
    b.reset();
    assert_eq!(b.ceiling(), base);
}

#[test]
fn credentials_are_private_and_round_trip() {
    let dir = TempDir::new("store");
    let store = Store::at(dir.0.join("state/sessions"));
    let c = Credentials {
        name: "work".into(),
        endpoint: "example.org:7220".into(),
        tenant: 7,
        agent: 1,
        session_id: 0x1234_5678,
        resume_token: [0x5A; 16],
        last_seq: 99,
        next_seq: 12,
        last_seen: 1_700_000_000,
    };
    let p = store.save(&c).unwrap();
    let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "credential file mode {mode:o}");
    let dmode = std::fs::metadata(store.dir()).unwrap().permissions().mode() & 0o777;
    assert_eq!(dmode, 0o700, "credential dir mode {dmode:o}");
    // Valid JSON with the documented fields.
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    assert_eq!(v["session_id"], 0x1234_5678);
    assert_eq!(v["resume_token"], hex(&[0x5A; 16]));
    assert_eq!(store.load("work").unwrap(), c);
    // Saving again keeps 0600.
    store.save(&c).unwrap();
    assert_eq!(
        std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(store.list().unwrap(), vec![c.clone()]);

    let blob = c.export();
    assert!(blob.starts_with("ct1:") && !blob.contains(char::is_whitespace));
    assert_eq!(Credentials::import(&blob).unwrap(), c);
    assert!(Credentials::import("ct1:00").is_err());
    assert!(matches!(store.load("nope"), Err(ClientError::NotSaved(_))));
    store.remove("work").unwrap();
    assert!(store.list().unwrap().is_empty());
}
