//! Black-box end-to-end tests of `clawtermd` with real `claw-agent` echo pods, over TCP.
//!
//! Every test runs under each of (epoll, 1 shard), (epoll, 2 shards), (uring, 1 shard),
//! (uring, 2 shards). The server's output is checked by the independent decoder in
//! `common` (own framing and CRC-16/UMTS; strict SESSION_ID/SEQ/FLAGS checks).

mod common;
use clawterm_testkit as harness;

use common::*;
use std::time::{Duration, Instant};

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// The SEQ of a RESUMED that follows a client-side drop: `expected`, or `expected + 1` when the
/// server had not yet seen the old connection go and sent it `TAKEN_OVER` first (docs §7.10:
/// that ERROR takes the session's next SEQ).
fn assert_seq_after_drop(r: &Resumed, expected: u32) {
    assert!(
        r.seq == expected || r.seq == expected + 1,
        "RESUMED SEQ {} (expected {expected}, or {} after a takeover): {r:?}",
        r.seq,
        expected + 1
    );
}

// 1 -------------------------------------------------------------------------------------------

#[test]
fn connect_and_echo_keeps_data_boundaries() {
    for_each_config(|cfg| {
        let env = Env::start(cfg, &[]);
        let mut c = env.client();
        let (sid, token) = c.connect_session(TENANT, AGENT, &TOKEN);
        assert_ne!(sid, 0);
        assert_ne!(token, [0u8; 16], "resume token is all zeros");
        let msgs: Vec<Vec<u8>> = [1usize, 7, 100, 1500, 4000]
            .iter()
            .enumerate()
            .map(|(i, &n)| (0..n).map(|j| (i * 31 + j) as u8).collect())
            .collect();
        // All five written back to back, so TCP may coalesce them: boundaries must survive.
        let mut bytes = Vec::new();
        for m in &msgs {
            bytes.extend(c.next_frame_bytes(DATA, m).1);
        }
        c.send_raw(&bytes);
        for (i, m) in msgs.iter().enumerate() {
            let f = c.recv_data();
            assert_eq!(f.seq, 2 + i as u32);
            assert_eq!(f.flags, 0);
            assert_eq!(f.payload, *m, "message {i} came back different");
        }
        c.expect_silence(ms(200));
        // A second session on the same server gets another id and token.
        let mut c2 = env.client();
        let (sid2, token2) = c2.connect_session(TENANT, AGENT, &TOKEN);
        assert_ne!(sid2, sid);
        assert_ne!(token2, token);
        assert_eq!(c2.echo(b"second"), 2);
        assert_eq!(c.echo(b"first again"), 7);
    });
}

// 2 -------------------------------------------------------------------------------------------

#[test]
fn thousand_frames_in_order_and_acked() {
    for_each_config(|cfg| {
        let env = Env::start(cfg, &[]);
        let mut c = env.session();
        let (sid, token) = (c.sid, c.resume_token);
        let n = 1000u32;
        let payload =
            |i: u32| format!("frame-{i:04}-{}", "x".repeat((i % 50) as usize)).into_bytes();
        // Written in chunks of 100 frames.
        for chunk in 0..10 {
            let mut bytes = Vec::new();
            for i in chunk * 100..(chunk + 1) * 100 {
                bytes.extend(c.next_frame_bytes(DATA, &payload(i)).1);
            }
            c.send_raw(&bytes);
        }
        for i in 0..n {
            let f = c.recv_frame();
            assert_eq!(f.typ, DATA, "frame {i}: {f:?}");
            assert_eq!(f.seq, 2 + i, "frame {i}");
            assert_eq!(f.payload, payload(i), "frame {i}");
            // First half: one empty ACK per frame (v1 style); second half: cumulative ACKs.
            if i < n / 2 {
                c.send(ACK, &[]);
            } else if i % 100 == 99 {
                c.send(ACK, &f.seq.to_be_bytes());
            }
        }
        // Sync point: the server handled every ACK above before this DATA.
        assert_eq!(c.echo(b"sync"), n + 2);
        c.expect_silence(ms(100));
        let client_seq = c.tx_seq;
        c.drop_abruptly();
        // last_seq 0 asks for everything still unacknowledged: only the sync echo is.
        let mut c2 = env.client();
        c2.tx_seq = client_seq;
        let r = c2.resume(sid, 0, &token);
        assert_eq!(
            r.flags, 0,
            "acknowledged frames must not be reported as GAP: {r:?}"
        );
        assert_seq_after_drop(&r, n + 3);
        assert_eq!(r.first_replay_seq, n + 2, "{r:?}");
        assert_eq!(r.last_client_seq, client_seq, "{r:?}");
        let f = c2.recv_frame();
        assert_eq!((f.typ, f.flags, f.seq), (DATA, F_REPLAY, n + 2), "{f:?}");
        assert_eq!(f.payload, b"sync");
        assert_eq!(c2.echo(b"after"), r.seq + 1);
    });
}

// 3 -------------------------------------------------------------------------------------------

#[test]
fn abrupt_loss_then_resume_replays_missed_frames() {
    for_each_config(|cfg| {
        let env = Env::start_opts(cfg, &[], true);
        let sessions = 20u32;
        struct Lost {
            sid: u32,
            token: [u8; 16],
            client_seq: u32,
            last_seen: u32,
            missed: Vec<(u32, Vec<u8>)>,
            last_data_seq: u32,
        }
        let mut lost = Vec::new();
        for s in 0..sessions {
            let mut c = env.session();
            let n = 10 + s % 7; // DATA frames sent, all echoed
            let keep = 3 + s % 4; // echoes the client "received" before the loss
            let mut bytes = Vec::new();
            for i in 0..n {
                bytes.extend(c.next_frame_bytes(DATA, format!("s{s}-m{i}").as_bytes()).1);
            }
            c.send_raw(&bytes);
            let mut missed = Vec::new();
            for i in 0..n {
                let f = c.recv_data();
                assert_eq!(f.seq, 2 + i);
                assert_eq!(f.payload, format!("s{s}-m{i}").as_bytes());
                if i >= keep {
                    missed.push((f.seq, f.payload.clone()));
                }
            }
            // One more DATA, written right before the socket goes away: its echo is produced
            // while the session is suspended.
            let tail = format!("s{s}-tail").into_bytes();
            let last_data_seq = c.send_data(&tail);
            missed.push((2 + n, tail));
            lost.push(Lost {
                sid: c.sid,
                token: c.resume_token,
                client_seq: c.tx_seq,
                last_seen: 1 + keep,
                missed,
                last_data_seq,
            });
            c.drop_abruptly();
        }
        // Let the last echoes land in the replay rings.
        std::thread::sleep(ms(150));
        for (k, l) in lost.iter().enumerate() {
            let mut c = env.client();
            c.tx_seq = l.client_seq;
            let r = c.resume(l.sid, l.last_seen, &l.token);
            let last_missed = l.missed.last().unwrap().0;
            assert_eq!(r.flags, 0, "session {k}: {r:?}");
            assert_seq_after_drop(&r, last_missed + 1);
            assert_eq!(r.first_replay_seq, l.last_seen + 1, "session {k}: {r:?}");
            assert_eq!(r.last_client_seq, l.last_data_seq, "session {k}: {r:?}");
            for (seq, payload) in &l.missed {
                let f = c.recv_frame();
                assert_eq!(
                    (f.typ, f.flags, f.seq),
                    (DATA, F_REPLAY, *seq),
                    "session {k}: {f:?}"
                );
                assert_eq!(&f.payload, payload, "session {k}");
            }
            // Nothing more is replayed; live traffic continues with new SEQs.
            c.expect_silence(ms(30));
            assert_eq!(c.echo(b"live"), r.seq + 1, "session {k}");
            assert_eq!(c.echo(b"live2"), r.seq + 2, "session {k}");
        }
        if cfg.shards == 2 {
            assert!(
                env.server
                    .log_contains("resume handed off to the owning shard"),
                "with 2 shards and {sessions} resumes, none was handed off to another shard"
            );
        }
    });
}

// 4 -------------------------------------------------------------------------------------------

#[test]
fn takeover_by_second_connection() {
    for_each_config(|cfg| {
        let env = Env::start(cfg, &[]);
        let mut a = env.session();
        assert_eq!(a.echo(b"from a"), 2);
        let (sid, token) = (a.sid, a.resume_token);
        let mut b = env.client();
        b.tx_seq = a.tx_seq;
        let r = b.resume(sid, a.last_seq, &token);
        assert_eq!(r.first_replay_seq, 0, "{r:?}");
        assert_eq!(r.last_client_seq, 2, "{r:?}");
        let e = a.expect_error(E_TAKEN_OVER);
        assert_eq!(e.sid, sid);
        assert_ne!(e.seq, r.seq, "TAKEN_OVER and RESUMED share a SEQ");
        assert!(r.seq == 3 || r.seq == 4, "{r:?} (ERROR {e:?})");
        let s = b.echo(b"from b");
        assert_eq!(s, r.seq + 1);
        assert_eq!(b.echo(b"again"), r.seq + 2);
        // The session survives the takeover: a third device can take it over too.
        let mut c = env.client();
        let r2 = c.resume(sid, b.last_seq, &token);
        b.expect_error(E_TAKEN_OVER);
        assert_eq!(r2.first_replay_seq, 0);
        c.echo(b"from c");
    });
}

// 5 -------------------------------------------------------------------------------------------

#[test]
fn suspend_then_resume_replays_output() {
    for_each_config(|cfg| {
        let env = Env::start(cfg, &[]);
        let mut c = env.session();
        assert_eq!(c.echo(b"before"), 2);
        let (sid, token) = (c.sid, c.resume_token);
        let mut bytes = c.next_frame_bytes(DATA, b"right before suspend").1;
        let data_seq = c.tx_seq;
        bytes.extend(c.next_frame_bytes(SUSPEND, &[]).1);
        c.send_raw(&bytes);
        // The server closes without sending anything (not even the echo).
        c.expect_closed();
        std::thread::sleep(ms(100));
        let mut c2 = env.client();
        c2.tx_seq = c.tx_seq;
        let r = c2.resume(sid, 2, &token);
        assert_eq!(r.flags, 0);
        assert_eq!(r.last_client_seq, data_seq, "{r:?}");
        assert_eq!(r.first_replay_seq, 3, "{r:?}");
        assert_eq!(r.seq, 4, "{r:?}");
        let f = c2.recv_frame();
        assert_eq!((f.typ, f.flags, f.seq), (DATA, F_REPLAY, 3), "{f:?}");
        assert_eq!(f.payload, b"right before suspend");
        assert_eq!(c2.echo(b"after"), 5);
        // SUSPEND again, with nothing pending: RESUMED with no replay.
        c2.send(SUSPEND, &[]);
        c2.expect_closed();
        let mut c3 = env.client();
        let r = c3.resume(sid, c2.last_seq, &token);
        assert_eq!((r.seq, r.first_replay_seq, r.flags), (6, 0, 0), "{r:?}");
        assert_eq!(c3.echo(b"third"), 7);
    });
}

// 6 -------------------------------------------------------------------------------------------

#[test]
fn disconnect_closes_session() {
    for_each_config(|cfg| {
        let env = Env::start(cfg, &[]);
        let mut c = env.session();
        c.echo(b"hello");
        let (sid, token, last) = (c.sid, c.resume_token, c.last_seq);
        c.send(DISCONNECT, &[]);
        c.expect_closed();
        let mut c2 = env.client();
        assert_eq!(c2.try_resume(sid, last, &token), Err(E_NO_SUCH_SESSION));
        // The server is fine.
        env.session().echo(b"still serving");
    });
}

// 7 -------------------------------------------------------------------------------------------

/// RESUMEs `sid` on a new connection and checks it works (the session survived an error).
fn assert_resumable(env: &Env, sid: u32, last_seq: u32, token: &[u8; 16]) {
    let mut c = env.client();
    let r = c.resume(sid, last_seq, token);
    assert_eq!(r.flags, 0, "{r:?}");
    let s = c.echo(b"survived");
    assert_eq!(s, r.seq + 1);
}

#[test]
fn error_paths() {
    for_each_config(|cfg| {
        let env = Env::start(cfg, &[]);

        // Bad CRC before the handshake.
        let mut c = env.client();
        let mut f = encode(
            0,
            1,
            CONNECT,
            0,
            &connect_payload(1, 1, TENANT, AGENT, &TOKEN),
        );
        let n = f.len();
        f[n - 1] ^= 0x55;
        c.send_raw(&f);
        c.expect_error(E_BAD_FRAME);

        // Bad CRC on a live session: BAD_FRAME with the session's id and next SEQ; the
        // session survives.
        let mut c = env.session();
        c.echo(b"x");
        let mut f = encode(c.sid, c.tx_seq + 1, DATA, 0, b"corrupt me");
        f[14] ^= 0x01;
        c.send_raw(&f);
        let e = c.expect_error(E_BAD_FRAME);
        assert_eq!((e.sid, e.seq), (c.sid, 3));
        assert_resumable(&env, c.sid, c.last_seq, &c.resume_token);

        // Bad FLAG byte (refused on the first byte).
        let mut c = env.client();
        c.send_raw(&[0x7F]);
        c.expect_error(E_BAD_FRAME);
        let mut c = env.session();
        c.send_raw(&[0x00]);
        let e = c.expect_error(E_BAD_FRAME);
        assert_eq!(e.seq, 2);
        assert_resumable(&env, c.sid, c.last_seq, &c.resume_token);

        // Unknown session and wrong token: the same NO_SUCH_SESSION.
        let mut c = env.client();
        assert_eq!(
            c.try_resume(0x1234_5679, 0, &[7; 16]),
            Err(E_NO_SUCH_SESSION)
        );
        let live = env.session();
        let mut c = env.client();
        let mut wrong = live.resume_token;
        wrong[15] ^= 1;
        assert_eq!(c.try_resume(live.sid, 1, &wrong), Err(E_NO_SUCH_SESSION));
        let mut live = live;
        live.echo(b"not taken over by a wrong token");

        // Another tenant's token.
        let mut c = env.client();
        assert_eq!(
            c.try_connect_session(TENANT, AGENT, &OTHER_TOKEN),
            Err(E_AUTH_FAILED)
        );
        let mut c = env.client();
        assert_eq!(c.try_connect_session(99, AGENT, &TOKEN), Err(E_AUTH_FAILED));

        // No pod for the agent.
        let mut c = env.client();
        assert_eq!(
            c.try_connect_session(TENANT, NO_POD_AGENT, &TOKEN),
            Err(E_NO_AGENT)
        );

        // CONNECT twice: PROTOCOL_VIOLATION, the session survives.
        let mut c = env.session();
        c.echo(b"y");
        let p = connect_payload(1, 1, TENANT, AGENT, &TOKEN);
        c.send_frame(0, c.tx_seq + 1, CONNECT, 0, &p);
        let e = c.expect_error(E_PROTOCOL_VIOLATION);
        assert_eq!((e.sid, e.seq), (c.sid, 3));
        assert_resumable(&env, c.sid, c.last_seq, &c.resume_token);

        // DATA before the handshake.
        let mut c = env.client();
        c.send_frame(0, 1, DATA, 0, b"too early");
        c.expect_error(E_PROTOCOL_VIOLATION);

        // Version 2.
        let mut c = env.client();
        c.send_connect_payload(&connect_payload(2, 1, TENANT, AGENT, &TOKEN));
        c.expect_error(E_UNSUPPORTED_VERSION);

        // 57-byte CONNECT payload.
        let mut c = env.client();
        let p = connect_payload(1, 1, TENANT, AGENT, &TOKEN);
        c.send_connect_payload(&p[..57]);
        c.expect_error(E_BAD_CONNECT);

        // 59- and 61-byte CONNECTs are accepted (wider capability fields).
        for extra in [1usize, 3] {
            let mut p = vec![1u8];
            p.extend(std::iter::repeat_n(0u8, extra));
            p.push(0x01);
            p.extend_from_slice(&connect_payload(1, 1, TENANT, AGENT, &TOKEN)[2..]);
            assert_eq!(p.len(), 58 + extra);
            let mut c = env.client();
            c.send_connect_payload(&p);
            let f = c.recv_frame();
            assert_eq!(f.typ, ACCEPT, "{}-byte CONNECT: {f:?}", p.len());
            c.echo(b"wide caps");
        }

        // Legacy 4-byte RESUME without --allow-legacy-resume.
        let s = env.session();
        let mut c = env.client();
        c.send_resume_payload(s.sid, 0, &s.sid.to_be_bytes());
        assert_eq!(c.resume_answer(), Err(E_AUTH_FAILED));
        let mut s = s;
        s.echo(b"not taken over by a legacy RESUME");

        // A second server: --max-payload 1024, --max-sessions 2, --allow-legacy-resume.
        let env2 = Env::start(
            cfg,
            &[
                "--max-payload",
                "1024",
                "--max-sessions",
                "2",
                "--allow-legacy-resume",
            ],
        );
        // LEN over the maximum, before the handshake (header only: refused on the header).
        let mut c = env2.client();
        c.send_raw(&header(0, 1, CONNECT, 0, 2000));
        c.expect_error(E_TOO_LARGE);
        let mut a = env2.session();
        // Exactly the maximum is fine.
        let big = vec![0x42u8; 1024];
        assert_eq!(a.echo(&big), 2);
        // LEN over the maximum on a live session: TOO_LARGE, the session survives.
        a.send_raw(&header(a.sid, a.tx_seq + 1, DATA, 0, 2000));
        let e = a.expect_error(E_TOO_LARGE);
        assert_eq!((e.sid, e.seq), (a.sid, 3));
        let mut b = env2.session();
        b.echo(b"second session");
        // Third session: OVERLOADED (the suspended one counts).
        let mut c = env2.client();
        assert_eq!(
            c.try_connect_session(TENANT, AGENT, &TOKEN),
            Err(E_OVERLOADED)
        );
        // Legacy RESUME works with --allow-legacy-resume, replaying everything unacknowledged.
        let mut l = env2.client();
        l.send_resume_payload(a.sid, 0, &a.sid.to_be_bytes());
        let r = l
            .resume_answer()
            .expect("legacy RESUME refused with --allow-legacy-resume");
        assert_eq!(
            (r.seq, r.first_replay_seq, r.last_client_seq),
            (4, 2, 2),
            "{r:?}"
        );
        let f = l.recv_frame();
        assert_eq!((f.typ, f.flags, f.seq), (DATA, F_REPLAY, 2), "{f:?}");
        assert_eq!(f.payload, big);
        assert_eq!(l.echo(b"legacy"), 5);
        // Disconnecting one frees a slot.
        l.send(DISCONNECT, &[]);
        l.expect_closed();
        let mut c = env2.client();
        c.connect_session(TENANT, AGENT, &TOKEN);
        c.echo(b"third");
    });
}

// 8 -------------------------------------------------------------------------------------------

#[test]
fn keepalive_sent_when_idle_never_echoed() {
    for_each_config(|cfg| {
        // Idle client receives the server's KEEPALIVEs.
        let env = Env::start(cfg, &["--keepalive", "0.3"]);
        let mut c = env.session();
        let start = Instant::now();
        let mut count = 0;
        while start.elapsed() < ms(1300) {
            match c.recv_event(ms(50)) {
                Event::Frame(f) => {
                    assert_eq!(f.typ, KEEPALIVE, "{f:?}");
                    count += 1;
                }
                Event::Timeout => {}
                Event::Closed => panic!("closed while idle"),
            }
        }
        assert!(
            (2..=5).contains(&count),
            "{count} KEEPALIVEs in 1.3 s with --keepalive 0.3"
        );
        c.echo(b"still here");
        drop(env);

        // Client KEEPALIVEs are not answered.
        let env = Env::start(cfg, &["--keepalive", "30"]);
        let mut c = env.session();
        for _ in 0..5 {
            c.send(KEEPALIVE, &[]);
        }
        c.expect_silence(ms(1000));
        assert_eq!(c.echo(b"after keepalives"), 2);
    });
}

// 9 -------------------------------------------------------------------------------------------

#[test]
fn idle_timeout_closes_and_session_resumes() {
    for_each_config(|cfg| {
        let env = Env::start(cfg, &["--idle-timeout", "0.5", "--keepalive", "0.2"]);
        let mut quiet = env.session();
        let mut chatty = env.session();
        let start = Instant::now();
        let mut quiet_closed_at = None;
        while start.elapsed() < ms(1500) {
            // The chatty client sends a KEEPALIVE every 150 ms and must stay open.
            chatty.send(KEEPALIVE, &[]);
            let step = Instant::now() + ms(150);
            while Instant::now() < step {
                if quiet_closed_at.is_none() {
                    match quiet.recv_event(ms(10)) {
                        Event::Frame(f) => assert_eq!(f.typ, KEEPALIVE, "{f:?}"),
                        Event::Closed => quiet_closed_at = Some(start.elapsed()),
                        Event::Timeout => {}
                    }
                }
                match chatty.recv_event(ms(10)) {
                    Event::Frame(f) => assert_eq!(f.typ, KEEPALIVE, "{f:?}"),
                    Event::Closed => panic!("a client sending KEEPALIVEs was closed as idle"),
                    Event::Timeout => {}
                }
            }
        }
        let at = quiet_closed_at.expect("idle client not closed within 1.5 s (--idle-timeout 0.5)");
        assert!(at >= ms(400), "idle client closed too early: {at:?}");
        chatty.echo(b"chatty");
        let mut c = env.client();
        let r = c.resume(quiet.sid, quiet.last_seq, &quiet.resume_token);
        assert_eq!((r.flags, r.first_replay_seq), (0, 0), "{r:?}");
        assert_eq!(c.echo(b"back"), r.seq + 1);
    });
}

// 10 ------------------------------------------------------------------------------------------

#[test]
fn slowloris_handshake_timeout() {
    for_each_config(|cfg| {
        let env = Env::start(cfg, &["--handshake-timeout", "1"]);
        let mut live = env.session();
        live.echo(b"warm");
        let addr = env.addr();
        let slow = std::thread::spawn(move || {
            let mut c = Client::connect(addr);
            let start = Instant::now();
            c.send_raw(&encode(0, 1, CONNECT, 0, &[0; 58])[..5]);
            c.expect_closed_within(Duration::from_secs(4));
            start.elapsed()
        });
        let start = Instant::now();
        let mut echoes = 0;
        while !slow.is_finished() && start.elapsed() < Duration::from_secs(5) {
            live.echo(format!("tick {echoes}").as_bytes());
            echoes += 1;
            std::thread::sleep(ms(50));
        }
        let took = slow
            .join()
            .expect("slowloris connection not closed in time");
        assert!(took <= Duration::from_secs(3), "closed after {took:?}");
        assert!(
            took >= ms(800),
            "closed after {took:?}, before the handshake timeout"
        );
        assert!(echoes >= 10, "only {echoes} echoes during {took:?}");
        live.echo(b"after");
    });
}

// 11 ------------------------------------------------------------------------------------------

#[test]
fn garbage_connections_do_not_disturb_live_session() {
    for_each_config(|cfg| {
        let env = Env::start(cfg, &[]);
        let mut live = env.session();
        live.echo(b"before");
        let mut rng = Rng::new(0x5eed ^ cfg.shards as u64 ^ ((cfg.io.len() as u64) << 8));
        let http = b"GET / HTTP/1.1\r\nHost: localhost\r\nUser-Agent: e2e\r\n\r\n";
        let mut total = 0;
        for batch in 0..20 {
            let mut conns = Vec::new();
            for _ in 0..50 {
                let mut c = Client::connect(env.addr());
                let bytes = match rng.below(4) {
                    0 => http.to_vec(),
                    1 => {
                        let n = 1 + rng.below(300) as usize;
                        rng.bytes(n)
                    }
                    2 => {
                        // A plausible header followed by junk (and a wrong CRC, if complete).
                        let len = rng.below(64) as u16;
                        let mut b = header(rng.next_u64() as u32, 1, rng.next_u64() as u8, 0, len);
                        let n = rng.below(80) as usize;
                        b.extend(rng.bytes(n));
                        b
                    }
                    _ => Vec::new(),
                };
                c.send_raw_lossy(&bytes);
                conns.push(c);
                total += 1;
            }
            drop(conns);
            live.echo(format!("during {batch}").as_bytes());
        }
        assert_eq!(total, 1000);
        live.echo(b"after");
        // Still accepting.
        let mut c = env.session();
        c.echo(b"new session");
        assert!(env
            .server
            .log_lines()
            .iter()
            .all(|l| !l.contains("panicked")));
    });
}

// 12 ------------------------------------------------------------------------------------------

#[test]
fn sigterm_exits_cleanly_with_sessions_open() {
    for_each_config(|cfg| {
        let mut env = Env::start(cfg, &[]);
        let mut attached: Vec<Client> = (0..4).map(|_| env.session()).collect();
        for c in &mut attached {
            c.echo(b"open");
        }
        let mut suspended = env.session();
        let mut bytes = suspended.next_frame_bytes(DATA, b"pending").1;
        bytes.extend(suspended.next_frame_bytes(SUSPEND, &[]).1);
        suspended.send_raw(&bytes);
        suspended.expect_closed();
        let start = Instant::now();
        let status = env.server.terminate(Duration::from_secs(5));
        let status = status.unwrap_or_else(|| panic!("clawtermd still running 5 s after SIGTERM"));
        assert!(
            status.success(),
            "clawtermd exited with {status} after SIGTERM"
        );
        assert!(start.elapsed() < Duration::from_secs(5));
        for c in &mut attached {
            // Whatever the server says on the way out, the connection ends.
            c.expect_closed_after_any(Duration::from_secs(2));
        }
    });
}

// Beyond the list: more of the contract ------------------------------------------------------

/// §2, §7.1–7.3: violations after the handshake are PROTOCOL_VIOLATION carrying the session's
/// id and next SEQ, and the session survives each; unknown types and NACK are ignored.
#[test]
fn protocol_violations_keep_the_session() {
    for_each_config(|cfg| {
        let env = Env::start(cfg, &[]);
        type Bad = fn(&mut Client);
        let cases: [(&str, Bad); 8] = [
            ("wrong SESSION_ID on DATA", |c| {
                c.send_frame(c.sid ^ 0x0100_0000, c.tx_seq + 1, DATA, 0, b"x")
            }),
            ("ACK with a 3-byte payload", |c| {
                c.send(ACK, &[0, 0, 2]);
            }),
            ("RESIZE with a 3-byte payload", |c| {
                c.send(RESIZE, &[0, 80, 0]);
            }),
            ("client sends ACCEPT", |c| {
                c.send(ACCEPT, &[0; 22]);
            }),
            ("client sends ERROR", |c| {
                c.send(ERROR, &[0, 1]);
            }),
            ("client sends RESUMED", |c| {
                c.send(RESUMED, &[0; 12]);
            }),
            ("RESUME after the handshake", |c| {
                let p = resume_payload(c.sid, c.last_seq, &c.resume_token);
                c.send(RESUME, &p);
            }),
            ("wrong SESSION_ID on KEEPALIVE", |c| {
                c.send_frame(0, c.tx_seq + 1, KEEPALIVE, 0, &[])
            }),
        ];
        for (what, bad) in cases {
            let mut c = env.session();
            // Ignored: unknown type, NACK, a good RESIZE, both ACK forms.
            c.send(0x77, b"unknown type");
            c.send(NACK, &[0, 0, 0, 1]);
            c.send(RESIZE, &[0, 80, 0, 24]);
            assert_eq!(c.echo(b"ok"), 2, "{what}");
            c.send(ACK, &[]);
            c.send(ACK, &2u32.to_be_bytes());
            bad(&mut c);
            let f = c.recv_frame();
            assert!(
                f.typ == ERROR && f.error_code() == E_PROTOCOL_VIOLATION,
                "{what}: expected ERROR 6, got {f:?}"
            );
            assert_eq!((f.sid, f.seq), (c.sid, 3), "{what}");
            c.expect_closed();
            assert_resumable(&env, c.sid, c.last_seq, &c.resume_token);
        }

        // Before the handshake.
        let s = env.session();
        let cases: Vec<(&str, Vec<u8>)> = vec![
            (
                "CONNECT with a session id",
                encode(
                    5,
                    1,
                    CONNECT,
                    0,
                    &connect_payload(1, 1, TENANT, AGENT, &TOKEN),
                ),
            ),
            (
                "RESUME with a 10-byte payload",
                encode(
                    0,
                    1,
                    RESUME,
                    0,
                    &resume_payload(s.sid, 1, &s.resume_token)[..10],
                ),
            ),
            (
                "RESUME whose header session id differs from the payload's",
                encode(
                    s.sid ^ 0x0200_0000,
                    1,
                    RESUME,
                    0,
                    &resume_payload(s.sid, 1, &s.resume_token),
                ),
            ),
            (
                "KEEPALIVE before the handshake",
                encode(0, 1, KEEPALIVE, 0, &[]),
            ),
            (
                "SUSPEND before the handshake",
                encode(0, 1, SUSPEND, 0, &[]),
            ),
        ];
        for (what, bytes) in cases {
            let mut c = env.client();
            c.send_raw(&bytes);
            let f = c.recv_frame();
            assert!(
                f.typ == ERROR && f.error_code() == E_PROTOCOL_VIOLATION,
                "{what}: expected ERROR 6, got {f:?}"
            );
            c.expect_closed();
        }
        // The session those RESUMEs named was not touched.
        let mut s = s;
        s.echo(b"untouched");
    });
}

/// §2.1, §5: CONNECT checks in order version, shape, token, pod, capacity; AGENT_ID-restricted
/// tokens.
#[test]
fn connect_check_order_and_agent_tokens() {
    for_each_config(|cfg| {
        let env = Env::start(cfg, &["--max-sessions", "1"]);
        let try_payload = |p: &[u8]| -> Result<(), u16> {
            let mut c = env.client();
            c.send_connect_payload(p);
            let f = c.recv_frame();
            if f.typ == ERROR {
                c.expect_closed();
                return Err(f.error_code());
            }
            assert_eq!(f.typ, ACCEPT);
            Ok(())
        };
        // Version before shape.
        let p = connect_payload(2, 1, TENANT, AGENT, &TOKEN);
        assert_eq!(try_payload(&p[..57]), Err(E_UNSUPPORTED_VERSION));
        // Shape before token.
        let p = connect_payload(1, 1, TENANT, AGENT, &OTHER_TOKEN);
        assert_eq!(try_payload(&p[..57]), Err(E_BAD_CONNECT));
        let mut long = connect_payload(1, 1, TENANT, AGENT, &TOKEN);
        long.extend_from_slice(&[0; 2]);
        assert_eq!(try_payload(&long), Err(E_BAD_CONNECT), "60-byte CONNECT");
        // Token before pod.
        let p = connect_payload(1, 1, TENANT, NO_POD_AGENT, &OTHER_TOKEN);
        assert_eq!(try_payload(&p), Err(E_AUTH_FAILED));
        // Restricted token: good for AGENT only.
        let p = connect_payload(1, 1, RESTRICTED_TENANT, AGENT, &RESTRICTED_TOKEN);
        assert_eq!(try_payload(&p), Err(E_NO_AGENT), "token accepted, no pod");
        let p = connect_payload(1, 1, RESTRICTED_TENANT, NO_POD_AGENT, &RESTRICTED_TOKEN);
        assert_eq!(
            try_payload(&p),
            Err(E_AUTH_FAILED),
            "token for another agent"
        );
        // Pod before capacity.
        let _one = env.session();
        let p = connect_payload(1, 1, TENANT, NO_POD_AGENT, &TOKEN);
        assert_eq!(try_payload(&p), Err(E_NO_AGENT));
        let p = connect_payload(1, 1, TENANT, AGENT, &TOKEN);
        assert_eq!(try_payload(&p), Err(E_OVERLOADED));
    });
}

/// §2.2, §2.5: ACCEPT advertises RELIABLE and ROAM; a RELIABLE client gets cumulative ACKs.
#[test]
fn reliable_client_gets_cumulative_acks() {
    for_each_config(|cfg| {
        let env = Env::start(cfg, &[]);
        let mut c = env.client();
        c.send_connect_payload(&connect_payload(1, 0x03, TENANT, AGENT, &TOKEN));
        let a = c.recv_frame();
        assert_eq!(a.typ, ACCEPT);
        assert_eq!(
            a.payload[5] & 0x06,
            0x06,
            "server caps lack RELIABLE|ROAM: {a:?}"
        );
        let mut bytes = Vec::new();
        for i in 0..3 {
            bytes.extend(c.next_frame_bytes(DATA, format!("r{i}").as_bytes()).1);
        }
        let last = c.tx_seq;
        c.send_raw(&bytes);
        let mut echoes = 0;
        let mut acked = 0;
        while echoes < 3 || acked < last {
            let f = c.recv_frame();
            match f.typ {
                DATA => {
                    assert_eq!(f.payload, format!("r{echoes}").as_bytes());
                    echoes += 1;
                }
                ACK => {
                    let v = f.u32_at(0);
                    assert!(
                        v >= acked && v <= last,
                        "ACK {v} after {acked}, last DATA {last}"
                    );
                    acked = v;
                }
                _ => panic!("unexpected {f:?}"),
            }
        }
    });
}

/// §2.4, §4, §7.6: a suspended session's ring overflow is reported as GAP, once.
#[test]
fn ring_overflow_reports_gap_once() {
    for_each_config(|cfg| {
        let env = Env::start(cfg, &["--ring-bytes", "4096", "--max-payload", "1024"]);
        let mut c = env.session();
        let (sid, token) = (c.sid, c.resume_token);
        let mut bytes = Vec::new();
        let n = 12u32;
        for i in 0..n {
            bytes.extend(c.next_frame_bytes(DATA, &[i as u8; 1000]).1);
        }
        bytes.extend(c.next_frame_bytes(SUSPEND, &[]).1);
        c.send_raw(&bytes);
        c.expect_closed();
        std::thread::sleep(ms(200));
        // Echoes took SEQs 2..=13; the ring holds at most 4 of them.
        let mut r1 = env.client();
        let r = r1.resume(sid, 1, &token);
        assert_eq!(r.flags, F_GAP, "{r:?}");
        assert_eq!(r.seq, n + 2, "{r:?}");
        assert_eq!(r.last_client_seq, n + 1, "{r:?}");
        let first = r.first_replay_seq;
        assert!(first > 2 && first >= n + 2 - 4, "{r:?}");
        for seq in first..n + 2 {
            let f = r1.recv_frame();
            assert_eq!((f.typ, f.flags, f.seq), (DATA, F_REPLAY, seq), "{f:?}");
            assert_eq!(f.payload, vec![(seq - 2) as u8; 1000]);
        }
        r1.expect_silence(ms(50));
        // Nothing acknowledged, nothing more dropped: the same replay, no GAP this time.
        drop(r1);
        std::thread::sleep(ms(50));
        let mut r2 = env.client();
        let r = r2.resume(sid, 1, &token);
        assert_eq!(r.flags, 0, "GAP reported twice: {r:?}");
        assert_eq!(r.first_replay_seq, first, "{r:?}");
        for seq in first..n + 2 {
            let f = r2.recv_frame();
            assert_eq!((f.typ, f.seq), (DATA, seq));
        }
        r2.echo(b"live");
    });
}

/// §2.4, §2.5: empty ACKs on a new connection count the replayed frames first.
#[test]
fn empty_acks_count_replayed_frames_first() {
    for_each_config(|cfg| {
        let env = Env::start(cfg, &[]);
        let mut c = env.session();
        let (sid, token) = (c.sid, c.resume_token);
        for i in 0..3 {
            assert_eq!(c.echo(&[b'a' + i]), 2 + i as u32);
        }
        let tx = c.tx_seq;
        c.drop_abruptly();
        let mut c = env.client();
        c.tx_seq = tx;
        let r = c.resume(sid, 1, &token);
        assert_seq_after_drop(&r, 5);
        assert_eq!(r.first_replay_seq, 2, "{r:?}");
        for seq in 2..5 {
            assert_eq!(c.recv_frame().seq, seq);
        }
        let live = c.echo(b"live");
        assert_eq!(live, r.seq + 1);
        // Four empty ACKs: replayed 2, 3, 4, then the live echo.
        for _ in 0..4 {
            c.send(ACK, &[]);
        }
        let sync = c.echo(b"sync");
        let tx = c.tx_seq;
        c.drop_abruptly();
        let mut c = env.client();
        c.tx_seq = tx;
        let r = c.resume(sid, 0, &token);
        assert_seq_after_drop(&r, sync + 1);
        assert_eq!((r.first_replay_seq, r.flags), (sync, 0), "{r:?}");
        let f = c.recv_frame();
        assert_eq!(
            (f.seq, f.flags, &f.payload[..]),
            (sync, F_REPLAY, &b"sync"[..])
        );
        c.echo(b"done");
    });
}

/// §4: the agent closing an attached session: remaining DATA (split to --max-payload), then
/// DISCONNECT, then close; closing a suspended one keeps the output for the resume.
#[test]
fn agent_exit_delivers_output_then_disconnect() {
    for_each_config(|cfg| {
        let env = Env::start_opts(cfg, &["--max-payload", "1024"], true);
        let _big = env.extra_agent(3, &["exec", "--", "head", "-c", "5000", "/dev/zero"]);
        let _reader = env.extra_agent(4, &["exec", "--", "sh", "-c", "read x; echo got $x"]);

        // Attached: 5000 bytes in frames of at most 1024, then DISCONNECT, then close.
        let mut c = env.client();
        c.connect_session(TENANT, 3, &TOKEN);
        let mut got = 0;
        loop {
            let f = c.recv_skip_idle();
            match f.typ {
                DATA => {
                    assert!(f.payload.len() <= 1024, "DATA over --max-payload: {f:?}");
                    assert!(f.payload.iter().all(|&b| b == 0));
                    got += f.payload.len();
                }
                DISCONNECT => break,
                _ => panic!("unexpected {f:?}"),
            }
        }
        assert_eq!(got, 5000);
        c.expect_closed();
        let mut again = env.client();
        assert_eq!(
            again.try_resume(c.sid, c.last_seq, &c.resume_token),
            Err(E_NO_SUCH_SESSION)
        );

        // Suspended: the agent's last output and its exit wait for the client.
        let mut c = env.client();
        c.connect_session(TENANT, 4, &TOKEN);
        let (sid, token) = (c.sid, c.resume_token);
        let mut bytes = c.next_frame_bytes(DATA, b"abc\n").1;
        bytes.extend(c.next_frame_bytes(SUSPEND, &[]).1);
        c.send_raw(&bytes);
        c.expect_closed();
        std::thread::sleep(ms(500));
        let mut c = env.client();
        let r = c.resume(sid, 1, &token);
        assert_eq!(r.first_replay_seq, 2, "{r:?}");
        let mut out = Vec::new();
        loop {
            let f = c.recv_frame();
            match (f.typ, f.flags) {
                (DATA, F_REPLAY) => out.extend_from_slice(&f.payload),
                (DISCONNECT, 0) => break,
                _ => panic!("expected the replay then DISCONNECT, got {f:?}"),
            }
        }
        assert_eq!(out, b"got abc\n");
        c.expect_closed();
        let mut c = env.client();
        assert_eq!(c.try_resume(sid, r.seq, &token), Err(E_NO_SUCH_SESSION));
    });
}

// Handshake refusals decided from the header (docs §7.7) ---------------------------------------

/// §2, §2.1, §2.3, §4: before the handshake the answer depends on the frame, not on a buffer
/// size: a CONNECT of the wrong length is BAD_CONNECT (UNSUPPORTED_VERSION when its version is
/// not 1, which is checked first), a RESUME of the wrong length and any other type are
/// PROTOCOL_VIOLATION, and only LEN over --max-payload is TOO_LARGE. Each answer comes from the
/// header (plus, for CONNECT, the version byte): the rest of the payload is never waited for.
#[test]
fn handshake_refusals_follow_the_contract_whatever_the_size() {
    for_each_config(|cfg| {
        let env = Env::start(cfg, &["--max-payload", "1024"]);
        let mut live = env.session();
        live.echo(b"before");

        // (what, header fields, payload, expected code)
        let mut connect_v1 = vec![0u8; 200];
        connect_v1[0] = 1;
        let mut connect_v2 = vec![0u8; 200];
        connect_v2[0] = 2;
        let cases: [(&str, u8, Vec<u8>, u16); 5] = [
            (
                "200-byte CONNECT, version 1",
                CONNECT,
                connect_v1,
                E_BAD_CONNECT,
            ),
            (
                "200-byte CONNECT, version 2",
                CONNECT,
                connect_v2,
                E_UNSUPPORTED_VERSION,
            ),
            (
                "100-byte RESUME",
                RESUME,
                vec![0x11; 100],
                E_PROTOCOL_VIOLATION,
            ),
            (
                "1000-byte DATA",
                DATA,
                vec![0x22; 1000],
                E_PROTOCOL_VIOLATION,
            ),
            ("empty CONNECT", CONNECT, Vec::new(), E_BAD_CONNECT),
        ];
        for (what, typ, payload, code) in &cases {
            // The whole frame.
            let mut c = env.client();
            c.send_raw(&encode(0, 1, *typ, 0, payload));
            let f = c.recv_frame();
            assert!(
                f.typ == ERROR && f.error_code() == *code,
                "{what}: expected ERROR {code}, got {f:?}"
            );
            assert_eq!((f.sid, f.seq), (0, 0), "{what}: {f:?}");
            c.expect_closed();
            // Only the header and the first payload byte: the same answer, without the server
            // waiting for (or buffering) the rest of the payload.
            let mut c = env.client();
            let mut partial = header(0, 1, *typ, 0, payload.len() as u16);
            partial.extend(payload.iter().take(1));
            c.send_raw(&partial);
            let f = c.recv_frame();
            assert!(
                f.typ == ERROR && f.error_code() == *code,
                "{what} (header + 1 byte): expected ERROR {code}, got {f:?}"
            );
            c.expect_closed();
        }

        // A wrong-length CONNECT's version byte is waited for: nothing is answered before it.
        let mut c = env.client();
        c.send_raw(&header(0, 1, CONNECT, 0, 200));
        c.expect_silence(ms(300));
        c.send_raw(&[2]);
        c.expect_error(E_UNSUPPORTED_VERSION);

        // LEN over --max-payload is TOO_LARGE, whatever the type, from the header alone.
        for typ in [DATA, CONNECT, RESUME, KEEPALIVE] {
            let mut c = env.client();
            c.send_raw(&header(0, 1, typ, 0, 1025));
            let f = c.recv_frame();
            assert!(
                f.typ == ERROR && f.error_code() == E_TOO_LARGE,
                "LEN 1025 {}: expected TOO_LARGE, got {f:?}",
                type_name(typ)
            );
            c.expect_closed();
        }

        // Well-formed handshakes still work, and the live session was never disturbed.
        live.echo(b"after");
        let mut c = env.session();
        c.echo(b"new");
    });
}

/// §6: the limit on connections mid-handshake (`--max-pending-handshakes`) is a connection
/// limit, answered with OVERLOADED on a plaintext port; a slot frees when a pending connection
/// completes its handshake or goes.
#[test]
fn pending_handshake_limit_answers_overloaded() {
    // One shard, so every connection lands on the shard whose limit is being filled.
    for cfg in CONFIGS.iter().copied().filter(|c| c.shards == 1) {
        let env = Env::start(cfg, &["--max-pending-handshakes", "2"]);
        let mut live = env.session();
        live.echo(b"attached sessions do not count");
        // p1 and p2 (accepted first: the listen queue is FIFO) hold the two slots; p2 has sent
        // part of a header.
        let mut p1 = env.client();
        let mut p2 = env.client();
        p2.send_raw(&header(0, 1, CONNECT, 0, 58)[..5]);
        let mut c = env.client();
        let f = c.recv_frame();
        assert!(
            f.typ == ERROR && f.error_code() == E_OVERLOADED,
            "[{cfg:?}] third pending handshake: expected OVERLOADED, got {f:?}"
        );
        c.expect_closed();
        // p1 completes its CONNECT: its slot frees.
        p1.connect_session(TENANT, AGENT, &TOKEN);
        p1.echo(b"p1 attached");
        let mut c = env.client();
        c.connect_session(TENANT, AGENT, &TOKEN);
        c.echo(b"slot freed");
        // Both slots taken again (p2 and a), then p2 goes: its slot frees too.
        let a = env.client();
        let mut c = env.client();
        assert_eq!(
            c.try_connect_session(TENANT, AGENT, &TOKEN),
            Err(E_OVERLOADED),
            "[{cfg:?}] with p2 and a pending"
        );
        drop(p2);
        std::thread::sleep(ms(200));
        let mut b = env.client();
        b.connect_session(TENANT, AGENT, &TOKEN);
        b.echo(b"p2's slot freed");
        live.echo(b"still fine");
        drop(a);
    }
}
