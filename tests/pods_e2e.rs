//! Black-box tests of the pod side of `clawtermd` (POD-LINK.md §1, §2, §4, §5) with real
//! `clawtermd` and `claw-agent` processes, plus a fake pod of our own where the test must see
//! what the daemon sends a pod.
//!
//! Unless a test says otherwise it runs under (io_uring, 2 shards) and (epoll, 2 shards).

mod pods_support;

use clawterm::proto::{FrameType, FLAG_GAP, FLAG_REPLAY};
use pods_support::*;
use std::time::{Duration, Instant};

const CONFIGS: [(&str, usize); 2] = [("epoll", 2), ("uring", 2)];

/// Runs `f` for each configuration, all of them even when one fails.
fn for_configs(configs: &[(&'static str, usize)], f: impl Fn(&'static str, usize)) {
    let mut failures = Vec::new();
    for &(io, shards) in configs {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(io, shards)));
        if let Err(e) = r {
            let msg = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "panic".into());
            failures.push(format!("[io={io} shards={shards}] {msg}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

fn expect_disconnect(c: &mut Client) {
    let f = c.recv();
    assert_eq!(
        f.ty,
        FrameType::Disconnect,
        "expected DISCONNECT, got {f:?}"
    );
}

/// CONNECT must be refused with NO_AGENT; retried for up to `t` (the registry follows the
/// directory asynchronously). Returns the number of tries.
fn expect_no_agent_within(srv: &Server, agent: u32, t: Duration) -> u32 {
    let deadline = Instant::now() + t;
    let mut tries = 0;
    loop {
        tries += 1;
        let mut c = srv.client();
        match c.try_connect(TENANT, agent) {
            Err(E_NO_AGENT) => {
                c.expect_closed(TIMEOUT);
                return tries;
            }
            Err(e) => panic!("CONNECT refused with ERROR {e}, expected NO_AGENT (5)"),
            Ok(sid) => {
                assert!(
                    Instant::now() < deadline,
                    "CONNECT to agent {agent} still accepted (session {sid:#x}) {t:?} after its pod went away"
                );
                c.close();
                std::thread::sleep(ms(5));
            }
        }
    }
}

// 1 -------------------------------------------------------------------------------------------

/// A pod started after the daemon is discovered (inotify) and used; a pod stopped with SIGTERM
/// (socket removed) is forgotten: new CONNECTs get NO_AGENT.
#[test]
fn pod_started_late_is_found_and_stopped_pod_gets_no_agent() {
    for_configs(&CONFIGS, |io, shards| {
        let dir = TempDir::new("late");
        let srv = Server::start(io, shards, &dir.sock(), &["--agent-grace", "2"]);
        // Nothing there yet.
        let mut c = srv.client();
        assert_eq!(c.try_connect(TENANT, AGENT), Err(E_NO_AGENT));
        c.expect_closed(TIMEOUT);

        let mut agent = AgentProc::spawn(&dir.sock(), TENANT, AGENT, &["echo"]);
        assert!(
            wait_until(Duration::from_secs(10), || agent.socket.exists()),
            "claw-agent never created its socket"
        );
        let appeared = Instant::now();
        let (mut c, refusals) = connect_until_accepted(srv.addr, AGENT, Duration::from_secs(1));
        let took = appeared.elapsed();
        println!(
            "[{io}/{shards}] socket appeared -> ACCEPT in {took:?} ({refusals} NO_AGENT first)"
        );
        assert!(took <= Duration::from_secs(1), "took {took:?}");
        agent.wait_listening();
        c.send_data(b"ping");
        assert_eq!(c.recv_bytes(4), b"ping");

        // SIGTERM: the agent removes its socket and exits.
        let sock = agent.socket.clone();
        let st = agent
            .terminate()
            .expect("claw-agent did not exit on SIGTERM");
        assert!(st.success(), "claw-agent exit status {st}");
        assert!(!sock.exists(), "claw-agent left its socket after SIGTERM");
        let tries = expect_no_agent_within(&srv, AGENT, Duration::from_secs(1));
        println!("[{io}/{shards}] NO_AGENT after SIGTERM on try {tries}");
        // A pod that never existed, for good measure.
        let mut c2 = srv.client();
        assert_eq!(c2.try_connect(TENANT, 99), Err(E_NO_AGENT));
        drop(c);
    });
}

// 2 -------------------------------------------------------------------------------------------

/// Pod killed (SIGKILL: its socket file stays, stale) and restarted within --agent-grace: the
/// attached session lives on, input typed meanwhile is held and delivered after the restart, in
/// order. The second restart is our fake pod, which must see HELLO, then REOPEN for each
/// session (plus DETACHED for a suspended one), then the held input.
#[test]
fn pod_restarted_within_grace_gets_reopen_then_held_input() {
    for_configs(&CONFIGS, |io, shards| {
        let dir = TempDir::new("regrace");
        let agent = AgentProc::echo(&dir.sock(), TENANT, AGENT);
        let srv = Server::start(io, shards, &dir.sock(), &["--agent-grace", "10"]);
        let mut c = srv.session(AGENT);
        let sid = c.sid;
        c.send_data(b"before");
        assert_eq!(c.recv_data(), b"before");
        // A second session, suspended (nothing unacknowledged in its ring).
        let mut d = srv.session(AGENT);
        let (d_sid, d_token) = (d.sid, d.token);
        d.send_data(b"d");
        assert_eq!(d.recv_data(), b"d");
        let d_last = d.last_seq;
        d.ack(d_last);
        d.suspend();

        // --- 1: the real agent dies and comes back.
        agent.kill9();
        std::thread::sleep(ms(300)); // let the daemon see the link's EOF
        assert!(
            dir.sock().join(format!("{TENANT}_{AGENT}")).exists(),
            "SIGKILL should leave the socket file"
        );
        // Typed while the pod is down: held.
        for m in [&b"held-1"[..], b"held-2", b"held-3"] {
            c.send_data(m);
        }
        c.expect_silence(ms(300));
        let agent = AgentProc::echo(&dir.sock(), TENANT, AGENT);
        for m in [&b"held-1"[..], b"held-2", b"held-3"] {
            assert_eq!(c.recv_data(), m, "held input after the restart");
        }
        c.send_data(b"after");
        assert_eq!(c.recv_data(), b"after");
        assert_eq!(c.sid, sid);

        // --- 2: it dies again; this time our fake pod comes back and records the link.
        agent.kill9();
        std::thread::sleep(ms(300));
        c.send_data(b"held-4");
        c.send_data(b"held-5");
        c.expect_silence(ms(200));
        let pod = FakePod::start(&dir.sock(), TENANT, AGENT, true);
        for m in [&b"held-4"[..], b"held-5"] {
            assert_eq!(c.recv_data(), m, "held input echoed by the fake pod");
        }
        c.send_data(b"new");
        assert_eq!(c.recv_data(), b"new");
        let evs = pod.drain(ms(300));
        let peer = c.local_addr().to_string();

        // Every link starts with the daemon's HELLO.
        let links: std::collections::BTreeSet<usize> = evs.iter().map(|e| e.link).collect();
        assert!(
            !links.is_empty() && links.len() <= shards,
            "links {links:?}"
        );
        for &l in &links {
            let first = evs.iter().find(|e| e.link == l).unwrap();
            match &first.msg {
                PodMsg::Hello { version: 1, name } => {
                    assert!(name.starts_with("clawtermd shard "), "HELLO name {name:?}")
                }
                m => panic!("link {l}: first message {m:?}, expected HELLO; all: {evs:#?}"),
            }
            assert_eq!(first.sid, 0, "HELLO SESSION_ID");
        }
        assert!(
            !evs.iter().any(|e| matches!(e.msg, PodMsg::Broken(_))),
            "{evs:#?}"
        );
        // The attached session: REOPEN (with its client's address), then the held input in
        // order, then the new input.
        let reopen_c = evs
            .iter()
            .position(|e| matches!(&e.msg, PodMsg::Reopen { peer: p, .. } if *p == peer))
            .unwrap_or_else(|| panic!("no REOPEN with peer {peer}: {evs:#?}"));
        let (link_c, psid_c) = (evs[reopen_c].link, evs[reopen_c].sid);
        match &evs[reopen_c].msg {
            PodMsg::Reopen { tenant, agent, .. } => {
                assert_eq!((*tenant, *agent), (TENANT, AGENT))
            }
            _ => unreachable!(),
        }
        let c_msgs: Vec<&PodMsg> = evs
            .iter()
            .filter(|e| e.link == link_c && e.sid == psid_c)
            .map(|e| &e.msg)
            .collect();
        assert_eq!(
            c_msgs,
            vec![
                &evs[reopen_c].msg,
                &PodMsg::Data(b"held-4".to_vec()),
                &PodMsg::Data(b"held-5".to_vec()),
                &PodMsg::Data(b"new".to_vec()),
            ],
            "messages for the attached session; all: {evs:#?}"
        );
        // The suspended session: REOPEN, then DETACHED.
        let others: Vec<&PodEvent> = evs
            .iter()
            .filter(|e| !(e.link == link_c && e.sid == psid_c) && e.sid != 0)
            .collect();
        assert_eq!(others.len(), 2, "suspended session's messages: {evs:#?}");
        assert!(
            matches!(
                &others[0].msg,
                PodMsg::Reopen {
                    tenant: TENANT,
                    agent: AGENT,
                    ..
                }
            ),
            "{evs:#?}"
        );
        assert_eq!(others[1].msg, PodMsg::Detached, "{evs:#?}");
        assert_eq!(others[0].sid, others[1].sid);
        // On each link every REOPEN comes before any DATA.
        for &l in &links {
            let on: Vec<&PodEvent> = evs.iter().filter(|e| e.link == l).collect();
            let last_reopen = on
                .iter()
                .rposition(|e| matches!(e.msg, PodMsg::Reopen { .. }));
            let first_data = on.iter().position(|e| matches!(e.msg, PodMsg::Data(_)));
            if let (Some(r), Some(dt)) = (last_reopen, first_data) {
                assert!(r < dt, "link {l}: DATA before a REOPEN: {on:#?}");
            }
        }

        // The suspended session still resumes and works through the fake pod.
        let mut d = srv.client();
        let r = d.resume(d_sid, d_last, &d_token);
        assert_eq!(r.flags & FLAG_GAP, 0);
        d.send_data(b"d-again");
        assert_eq!(d.recv_data(), b"d-again");
        let ev = pod.expect("ATTACHED for the resumed session");
        assert_eq!(ev.msg, PodMsg::Attached, "{ev:?}");
    });
}

/// CONNECT while a pod is lost (its link hit EOF; SIGKILL leaves the socket file) gets
/// NO_AGENT, whichever shard the connection lands on.
#[test]
fn connect_while_pod_lost_gets_no_agent_on_every_shard() {
    for_configs(&CONFIGS, |io, shards| {
        let dir = TempDir::new("lostconn");
        let agent = AgentProc::echo(&dir.sock(), TENANT, AGENT);
        let srv = Server::start(io, shards, &dir.sock(), &["--agent-grace", "10"]);
        let mut c = srv.session(AGENT);
        c.send_data(b"x");
        assert_eq!(c.recv_data(), b"x");
        agent.kill9();
        std::thread::sleep(ms(300)); // let the daemon see the link's EOF
        let mut answers = Vec::new();
        for _ in 0..8 {
            let mut x = srv.client();
            answers.push(x.try_connect(TENANT, AGENT));
        }
        assert!(
            answers.iter().all(|a| *a == Err(E_NO_AGENT)),
            "CONNECTs while the pod is lost (8 connections, spread over the shards): {answers:?}"
        );
    });
}

/// A pod's socket file appears at bind(), before listen(): a daemon connecting in between is
/// refused. A lost pod that comes back (within --agent-grace) and starts listening 50 ms after
/// its socket file appeared must still get its sessions back.
#[test]
fn lost_pod_back_listening_shortly_after_bind_is_reconnected() {
    for_configs(&CONFIGS, |io, shards| {
        let dir = TempDir::new("slowlisten");
        let agent = AgentProc::echo(&dir.sock(), TENANT, AGENT);
        let srv = Server::start(io, shards, &dir.sock(), &["--agent-grace", "10"]);
        let mut c = srv.session(AGENT);
        c.send_data(b"x");
        assert_eq!(c.recv_data(), b"x");
        agent.kill9();
        std::thread::sleep(ms(300));
        c.send_data(b"held");
        let _pod = FakePod::start_with(&dir.sock(), TENANT, AGENT, true, ms(50));
        match c.recv_event(Duration::from_secs(3)) {
            Event::Frame(f) if f.ty == FrameType::Data => assert_eq!(f.payload, b"held"),
            e => panic!(
                "lost pod back (listening 50 ms after bind): held input not echoed within 3 s: {e:?}"
            ),
        }
    });
}

/// First use of a pod whose socket file appeared 50 ms before it listens: a CONNECT accepted
/// in that window must still reach the pod.
#[test]
fn first_connect_to_pod_not_yet_listening_still_reaches_it() {
    for_configs(&CONFIGS, |io, shards| {
        let dir2 = TempDir::new("slowlisten2");
        let srv2 = Server::start(io, shards, &dir2.sock(), &["--agent-grace", "10"]);
        let t = std::thread::spawn({
            let d = dir2.sock();
            move || FakePod::start_with(&d, TENANT, AGENT, true, ms(50))
        });
        let path = dir2.sock().join(format!("{TENANT}_{AGENT}"));
        assert!(wait_until(Duration::from_secs(5), || path.exists()));
        let (mut c2, _) = connect_until_accepted(srv2.addr, AGENT, Duration::from_secs(1));
        let _pod2 = t.join().unwrap();
        c2.send_data(b"first");
        match c2.recv_event(Duration::from_secs(3)) {
            Event::Frame(f) if f.ty == FrameType::Data => assert_eq!(f.payload, b"first"),
            e => panic!(
                "session accepted while the pod was not listening yet: no echo within 3 s: {e:?}"
            ),
        }
    });
}

// 3 -------------------------------------------------------------------------------------------

/// Pod gone for good (--agent-grace 1): the attached client gets ERROR AGENT_GONE, DISCONNECT,
/// then EOF; a suspended session with output produced before the loss resumes afterwards and
/// gets its replay, then AGENT_GONE and DISCONNECT. Under uring the pod is SIGKILLed (stale
/// socket file stays); under epoll it is SIGTERMed (socket removed).
#[test]
fn pod_gone_for_good_ends_sessions_with_agent_gone() {
    for_configs(&CONFIGS, |io, shards| {
        let dir = TempDir::new("gone");
        let agent = AgentProc::echo(&dir.sock(), TENANT, AGENT);
        let srv = Server::start(io, shards, &dir.sock(), &["--agent-grace", "1"]);
        let mut a = srv.session(AGENT);
        a.send_data(b"a-1");
        assert_eq!(a.recv_data(), b"a-1");
        let mut b = srv.session(AGENT);
        let (b_sid, b_token) = (b.sid, b.token);
        b.send_data(b"b-1");
        assert_eq!(b.recv_data(), b"b-1");
        b.send_data(b"b-2");
        b.suspend();
        std::thread::sleep(ms(300)); // b-2's echo lands in the ring

        let t0 = Instant::now();
        if io == "uring" {
            agent.kill9();
        } else {
            agent.terminate().expect("claw-agent did not exit");
        }
        let e = expect_error_within(&mut a, E_AGENT_GONE, Duration::from_secs(6));
        let took = t0.elapsed();
        println!("[{io}/{shards}] AGENT_GONE {took:?} after the pod died: {e:?}");
        assert!(
            took >= ms(900),
            "AGENT_GONE after {took:?}, before the 1 s grace ran out"
        );
        expect_disconnect(&mut a);
        a.expect_closed(TIMEOUT);

        // The suspended session: replay, then AGENT_GONE, then DISCONNECT.
        let mut b = srv.client();
        let r = b.resume(b_sid, 1, &b_token);
        assert_eq!(r.flags & FLAG_GAP, 0, "{r:?}");
        let mut replay = Vec::new();
        let f = loop {
            let f = b.recv();
            if f.ty != FrameType::Data {
                break f;
            }
            assert_ne!(
                f.flags & FLAG_REPLAY,
                0,
                "replayed DATA without REPLAY: {f:?}"
            );
            replay.push((f.seq, f.payload));
        };
        assert_eq!(
            replay,
            vec![(2, b"b-1".to_vec()), (3, b"b-2".to_vec())],
            "replay"
        );
        assert_eq!(r.first_replay_seq, 2);
        assert_eq!(f.ty, FrameType::Error, "after the replay: {f:?}");
        assert_eq!(f.error_code(), Some(E_AGENT_GONE), "{f:?}");
        expect_disconnect(&mut b);
        b.expect_closed(TIMEOUT);
    });
}

fn expect_error_within(c: &mut Client, code: u16, t: Duration) -> Frame {
    let f = c.recv_within(t);
    assert_eq!(f.ty, FrameType::Error, "expected ERROR {code}, got {f:?}");
    assert_eq!(f.error_code(), Some(code), "{f:?}");
    f
}

// 4 -------------------------------------------------------------------------------------------

/// A fast producer (20 MB) to a slow attached client: every byte arrives, in order, then
/// DISCONNECT when the process exits; the daemon's RSS stays bounded (PAUSE/CONTINUE to the
/// agent, nothing dropped). io_uring, 2 shards.
#[test]
fn fast_producer_slow_attached_client_gets_every_byte() {
    const TOTAL: usize = 20_000_000;
    let dir = TempDir::new("slow");
    let _agent = AgentProc::exec_sh(
        &dir.sock(),
        TENANT,
        AGENT,
        &format!("head -c {TOTAL} /dev/zero | tr '\\0' 'y'"),
    );
    let srv = Server::start("uring", 2, &dir.sock(), &["--ring-bytes", "262144"]);
    let rss0 = rss_kib(srv.pid()).unwrap();
    let sampler = RssSampler::start(srv.pid());
    let t0 = Instant::now();
    let mut c = srv.session(AGENT);
    std::thread::sleep(Duration::from_secs(1)); // slow at first
    let mut got = 0usize;
    let mut frames = 0usize;
    let deadline = Instant::now() + Duration::from_secs(60);
    let end = loop {
        assert!(Instant::now() < deadline, "only {got} bytes after 60 s");
        let f = c.recv_within(Duration::from_secs(10));
        if f.ty != FrameType::Data {
            break f;
        }
        assert!(
            f.payload.iter().all(|&b| b == b'y'),
            "a byte other than 'y' at about offset {got}"
        );
        got += f.payload.len();
        frames += 1;
        c.ack(f.seq);
    };
    let elapsed = t0.elapsed();
    let (peak, samples) = sampler.finish();
    println!(
        "slow client: {got} bytes in {frames} DATA frames, {elapsed:?}; clawtermd VmRSS {rss0} KiB at start, peak {peak} KiB ({:.1} MiB) over {samples} samples",
        peak as f64 / 1024.0
    );
    assert_eq!(end.ty, FrameType::Disconnect, "after the data: {end:?}");
    assert_eq!(got, TOTAL, "bytes received");
    c.expect_closed(TIMEOUT);
    assert!(samples > 10, "too few RSS samples");
    assert!(peak < 64 * 1024, "clawtermd peak RSS {peak} KiB ≥ 64 MiB");
}

// 5, 6 ----------------------------------------------------------------------------------------

const PRODUCER: &str = "seq 1 600000";

/// The producer's output, computed locally (about 4.2 MB).
fn producer_output() -> Vec<u8> {
    let out = std::process::Command::new("sh")
        .args(["-c", PRODUCER])
        .output()
        .expect("run sh");
    assert!(out.status.success());
    assert!(out.stdout.len() > 4_000_000);
    out.stdout
}

/// CONNECT, SUSPEND at once, give the producer `wait`, then RESUME with last_seq 1 and read
/// (ACKing everything) until DISCONNECT. Returns (RESUMED, replayed frames, live frames).
#[allow(clippy::type_complexity)]
fn suspended_run(
    overflow: &str,
    wait: Duration,
) -> (Resumed, Vec<(u32, Vec<u8>)>, Vec<(u32, Vec<u8>)>) {
    let dir = TempDir::new(overflow);
    let _agent = AgentProc::exec_sh(&dir.sock(), TENANT, AGENT, PRODUCER);
    let srv = Server::start(
        "uring",
        2,
        &dir.sock(),
        &["--ring-bytes", "262144", "--overflow", overflow],
    );
    let c = srv.session(AGENT);
    let (sid, token) = (c.sid, c.token);
    c.suspend();
    std::thread::sleep(wait);
    let mut c = srv.client();
    let r = c.resume(sid, 1, &token);
    let (mut replay, mut live) = (Vec::new(), Vec::new());
    let deadline = Instant::now() + Duration::from_secs(30);
    let end = loop {
        assert!(Instant::now() < deadline, "no DISCONNECT after 30 s");
        let f = c.recv_within(Duration::from_secs(10));
        if f.ty != FrameType::Data {
            break f;
        }
        c.ack(f.seq);
        if f.flags & FLAG_REPLAY != 0 {
            assert!(live.is_empty(), "REPLAY frame after live frames: {f:?}");
            replay.push((f.seq, f.payload));
        } else {
            live.push((f.seq, f.payload));
        }
    };
    assert_eq!(end.ty, FrameType::Disconnect, "after the output: {end:?}");
    c.expect_closed(TIMEOUT);
    (r, replay, live)
}

fn check_seqs(frames: &[(u32, Vec<u8>)]) {
    for w in frames.windows(2) {
        assert_eq!(w[1].0, w[0].0 + 1, "DATA SEQs not consecutive");
    }
}

/// --overflow drop: a suspended session's ring keeps the newest output; RESUMED carries GAP and
/// the replay is the newest ≤ --ring-bytes of output, contiguous up to the end.
#[test]
fn overflow_drop_suspended_replays_newest_with_gap() {
    let expected = producer_output();
    let (r, replay, live) = suspended_run("drop", Duration::from_secs(2));
    let rb: Vec<u8> = replay.iter().flat_map(|(_, p)| p.clone()).collect();
    println!(
        "drop: RESUMED {r:?}; replay {} frames / {} bytes, then {} live frames",
        replay.len(),
        rb.len(),
        live.len()
    );
    assert_ne!(r.flags & FLAG_GAP, 0, "RESUMED without GAP: {r:?}");
    assert!(!replay.is_empty(), "empty replay");
    assert_eq!(r.first_replay_seq, replay[0].0, "first_replay_seq");
    assert!(r.first_replay_seq > 2, "nothing was dropped? {r:?}");
    check_seqs(&replay);
    assert!(rb.len() <= 262_144, "replay of {} bytes > ring", rb.len());
    assert!(
        rb.len() > 131_072,
        "replay of only {} bytes: the ring should hold the newest ~256 KiB",
        rb.len()
    );
    assert!(
        live.is_empty(),
        "the producer was still running 2 s later? {} live frames",
        live.len()
    );
    assert!(
        expected.ends_with(&rb),
        "the replay is not the end of the output (replay starts {:?}, ends {:?})",
        String::from_utf8_lossy(&rb[..40.min(rb.len())]),
        String::from_utf8_lossy(&rb[rb.len().saturating_sub(40)..])
    );
}

/// --overflow pause: the agent is paused instead, so after RESUME (and ACKing) every byte
/// arrives, and RESUMED has no GAP.
#[test]
fn overflow_pause_suspended_loses_nothing() {
    let expected = producer_output();
    let (r, replay, live) = suspended_run("pause", Duration::from_secs(1));
    let rb: usize = replay.iter().map(|(_, p)| p.len()).sum();
    println!(
        "pause: RESUMED {r:?}; replay {} frames / {rb} bytes, then {} live frames",
        replay.len(),
        live.len()
    );
    let first_seq = replay.first().map(|f| f.0);
    // Replayed frames keep their SEQs; RESUMED takes the next one; live DATA follows it.
    check_seqs(&replay);
    check_seqs(&live);
    if let (Some(last), Some(next)) = (replay.last(), live.first()) {
        assert!(
            last.0 < r.seq && r.seq < next.0,
            "RESUMED {r:?} not between replay and live"
        );
    }
    let all: Vec<(u32, Vec<u8>)> = replay.into_iter().chain(live).collect();
    let got: Vec<u8> = all.iter().flat_map(|(_, p)| p.clone()).collect();
    let missing_head = if expected.ends_with(&got) {
        format!(
            "; what arrived is the output minus its first {} bytes",
            expected.len() - got.len()
        )
    } else {
        String::new()
    };
    println!(
        "pause: {} of {} bytes arrived{missing_head}",
        got.len(),
        expected.len()
    );
    assert_eq!(
        r.flags & FLAG_GAP,
        0,
        "RESUMED with GAP: {r:?}; {} of {} bytes arrived{missing_head}",
        got.len(),
        expected.len()
    );
    if let Some(first) = first_seq {
        assert_eq!(r.first_replay_seq, first);
        assert_eq!(first, 2, "replay does not start at the first DATA");
    }
    assert_eq!(got.len(), expected.len(), "bytes received");
    assert!(got == expected, "output differs from the producer's");
}

// 7 -------------------------------------------------------------------------------------------

/// 200 sessions to one pod through a 2-shard daemon use at most 2 links (one per shard), each
/// starting with the daemon's HELLO, carrying the sessions' OPENs.
#[test]
fn two_hundred_sessions_use_at_most_one_link_per_shard() {
    for_configs(&CONFIGS, |io, shards| {
        let dir = TempDir::new("links");
        let pod = FakePod::start(&dir.sock(), TENANT, AGENT, true);
        let srv = Server::start(io, shards, &dir.sock(), &[]);
        let mut clients: Vec<Client> = (0..200).map(|_| srv.client()).collect();
        for c in clients.iter_mut() {
            c.send_connect(TENANT, AGENT);
        }
        for (i, c) in clients.iter_mut().enumerate() {
            c.connect_answer()
                .unwrap_or_else(|e| panic!("session {i}: CONNECT refused with {e}"));
        }
        for (i, c) in clients.iter_mut().enumerate() {
            c.send_data(format!("s{i}").as_bytes());
        }
        for (i, c) in clients.iter_mut().enumerate() {
            assert_eq!(c.recv_data(), format!("s{i}").into_bytes());
        }
        let evs = pod.drain(ms(200));
        let links: std::collections::BTreeSet<usize> = evs.iter().map(|e| e.link).collect();
        let opens: Vec<&PodEvent> = evs
            .iter()
            .filter(|e| matches!(e.msg, PodMsg::Open { .. }))
            .collect();
        let mut per_link = vec![0usize; pod.accepted()];
        for o in &opens {
            per_link[o.link] += 1;
        }
        println!(
            "[{io}/{shards}] 200 sessions -> {} links accepted by the pod, OPENs per link {per_link:?}",
            pod.accepted()
        );
        assert!(
            pod.accepted() >= 1 && pod.accepted() <= shards,
            "{} links for {shards} shards",
            pod.accepted()
        );
        assert_eq!(opens.len(), 200, "OPEN messages");
        let sids: std::collections::HashSet<(usize, u32)> =
            opens.iter().map(|e| (e.link, e.sid)).collect();
        assert_eq!(sids.len(), 200, "duplicate SESSION_IDs");
        let mut names = Vec::new();
        for &l in &links {
            let first = evs.iter().find(|e| e.link == l).unwrap();
            match &first.msg {
                PodMsg::Hello { version: 1, name } => names.push(name.clone()),
                m => panic!("link {l}: first message {m:?}"),
            }
        }
        names.sort();
        names.dedup();
        assert_eq!(
            names.len(),
            links.len(),
            "two links from one shard? {names:?}"
        );
    });
}

// Pod HELLO version (POD-LINK.md §1) -------------------------------------------------------------

/// A pod whose HELLO carries a version other than 1 is not spoken to: the daemon breaks the
/// link (the pod reads EOF) and logs a warning naming the version.
#[test]
fn pod_hello_with_another_version_breaks_the_link() {
    use clawterm::podlink::{self, Msg};
    use std::io::{ErrorKind, Read, Write};
    use std::os::unix::net::UnixListener;

    for_configs(&CONFIGS, |io, shards| {
        let dir = TempDir::new("hello-v2");
        let listener = UnixListener::bind(dir.sock().join(format!("{TENANT}_{AGENT}")))
            .expect("bind the fake pod's socket");
        listener.set_nonblocking(true).unwrap();
        let srv = Server::start(io, shards, &dir.sock(), &[]);
        // A CONNECT makes the client's shard open a link to the pod.
        let mut c = srv.client();
        c.send_connect(TENANT, AGENT);
        let deadline = Instant::now() + TIMEOUT;
        let mut link = loop {
            match listener.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    assert!(
                        Instant::now() < deadline,
                        "the daemon never connected to the pod; log:\n{}",
                        srv.log_tail(20)
                    );
                    std::thread::sleep(ms(2));
                }
                Err(e) => panic!("fake pod accept: {e}"),
            }
        };
        link.set_nonblocking(false).unwrap();
        let mut hello = Vec::new();
        podlink::encode(
            &mut hello,
            0,
            &Msg::Hello {
                version: 2,
                name: "pod from the future",
            },
        );
        link.write_all(&hello).expect("send HELLO v2");
        // The daemon's HELLO (and perhaps an OPEN), then EOF.
        link.set_read_timeout(Some(TIMEOUT)).unwrap();
        let mut got = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            match link.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => got.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == ErrorKind::ConnectionReset => break,
                Err(e) => panic!(
                    "the daemon kept the link to a version-2 pod open ({e}); log:\n{}",
                    srv.log_tail(20)
                ),
            }
        }
        match podlink::decode(&got) {
            Ok(podlink::Decoded::Msg {
                msg: Msg::Hello { version: 1, .. },
                ..
            }) => {}
            other => panic!("the daemon's first message was not HELLO v1: {other:?}"),
        }
        assert!(
            wait_until(TIMEOUT, || srv
                .log()
                .iter()
                .any(|l| l.contains("WARN") && l.contains("unsupported version 2"))),
            "no warning naming version 2; log:\n{}",
            srv.log_tail(20)
        );
        drop(c);
    });
}
