//! Black-box tests of the pod side of `clawtermd` (POD-LINK.md §1, §2, §4, §5) with real
//! `clawtermd` and `claw-agent` processes, plus a fake pod of our own where the test must see
//! what the daemon sends a pod.
//!
//! Unless a test says otherwise it runs under (io_uring, 2 shards) and (epoll, 2 shards).

use clawterm_testkit as harness;
mod pods_support;

use clawterm::proto::{FrameType, FLAG_GAP, FLAG_REPLAY};
use pods_support::*;
use std::time::{Duration, Instant};

const CONFIGS: [(&str, usize); 2] = [("epoll", 2), ("uring", 2)];

/// Runs `f` for each configuration, all of them even when one fails.
fn for_configs(configs: &[(&'static str, usize)], f: impl Fn(&'static str, usize)) {
    let failures = harness::failures_of(
        configs,
        |(io, shards)| format!("io={io} shards={shards}"),
        |(io, shards)| f(io, shards),
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// A new directory with an echo pod for (TENANT, AGENT) and a server started with
/// `--agent-grace GRACE` (drop order: server, pod, directory).
fn echo_pod_and_server(
    tag: &str,
    io: &'static str,
    shards: usize,
    grace: &str,
) -> (TempDir, AgentProc, Server) {
    let dir = TempDir::with_sock(tag);
    let agent = AgentProc::echo(&dir.sock(), TENANT, AGENT);
    let srv = Server::start(io, shards, &dir.sock(), &["--agent-grace", grace]);
    (dir, agent, srv)
}

/// A new session to AGENT whose first DATA, `x`, has come back.
fn echoing_session(srv: &Server) -> Client {
    let mut c = srv.session(AGENT);
    c.send_data(b"x");
    assert_eq!(c.recv_data(), b"x");
    c
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
        let dir = TempDir::with_sock("late");
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
        let (dir, agent, srv) = echo_pod_and_server("regrace", io, shards, "10");
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
                // The daemon speaks version 2 (it understands EXPORT and STATE).
                PodMsg::Hello { version: 2, name } => {
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
        let (_dir, agent, srv) = echo_pod_and_server("lostconn", io, shards, "10");
        let _c = echoing_session(&srv);
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
        let (dir, agent, srv) = echo_pod_and_server("slowlisten", io, shards, "10");
        let mut c = echoing_session(&srv);
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
        let dir2 = TempDir::with_sock("slowlisten2");
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
        let (_dir, agent, srv) = echo_pod_and_server("gone", io, shards, "1");
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

/// `yes` output: byte `o` of the stream is `y` when `o` is even, `\n` when odd.
fn check_yes(payload: &[u8], offset: usize) {
    let bad = payload
        .iter()
        .enumerate()
        .position(|(i, &b)| b != if (offset + i) % 2 == 0 { b'y' } else { b'\n' });
    if let Some(i) = bad {
        panic!(
            "output of `yes` broken at byte {}: {:?}",
            offset + i,
            String::from_utf8_lossy(&payload[i..(i + 20).min(payload.len())])
        );
    }
}

/// A fast producer (`yes | head -c 100000000`, 100 MB) to an attached client that reads slowly
/// from start to end (10 MB/s, about 10 s) but reads everything: every byte arrives, in order,
/// then DISCONNECT when the process exits; and clawtermd's peak RSS stays under its RSS before
/// the session + the ring's hard cap (--ring-bytes + max(--ring-bytes, 4 MiB): PAUSE/CONTINUE
/// to the agent, plus the output it had in flight) + 12 MiB, below what buffering even
/// 20 MB of the output would take. io_uring, 2 shards.
#[test]
fn fast_producer_slow_attached_client_gets_every_byte_in_bounded_memory() {
    const TOTAL: usize = 100_000_000;
    const RING: usize = 262_144;
    const RATE: f64 = 10_000_000.0; // bytes per second the client reads at most
    let dir = TempDir::with_sock("slow");
    let _agent = AgentProc::exec_sh(
        &dir.sock(),
        TENANT,
        AGENT,
        &format!("yes | head -c {TOTAL}"),
    );
    let srv = Server::start(
        "uring",
        2,
        &dir.sock(),
        &["--ring-bytes", &RING.to_string()],
    );
    let rss0 = rss_kib(srv.pid()).unwrap();
    let sampler = RssSampler::start(srv.pid());
    let t0 = Instant::now();
    let mut c = srv.session(AGENT);
    let mut got = 0usize;
    let mut frames = 0usize;
    let deadline = Instant::now() + Duration::from_secs(120);
    let end = loop {
        assert!(Instant::now() < deadline, "only {got} bytes after 120 s");
        let f = c.recv_within(Duration::from_secs(10));
        if f.ty != FrameType::Data {
            break f;
        }
        check_yes(&f.payload, got);
        got += f.payload.len();
        frames += 1;
        c.ack(f.seq);
        // Slow throughout: never ahead of RATE.
        let due = t0 + Duration::from_secs_f64(got as f64 / RATE);
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
    };
    let elapsed = t0.elapsed();
    let (peak, samples) = sampler.finish();
    let hwm = hwm_kib(srv.pid()).unwrap();
    let hard_cap_kib = ((RING + RING.max(4 << 20)) / 1024) as u64;
    let bound = rss0 + hard_cap_kib + 12 * 1024;
    println!(
        "slow client: {got} bytes in {frames} DATA frames, {elapsed:?} ({:.1} MB/s); clawtermd VmRSS {rss0} KiB before the session, sampled peak {peak} KiB over {samples} samples, VmHWM {hwm} KiB; bound {bound} KiB",
        got as f64 / elapsed.as_secs_f64() / 1e6
    );
    assert_eq!(end.ty, FrameType::Disconnect, "after the data: {end:?}");
    assert_eq!(got, TOTAL, "bytes received");
    c.expect_closed(TIMEOUT);
    assert!(samples > 100, "too few RSS samples: {samples}");
    assert!(
        peak.max(hwm) < bound,
        "clawtermd peak RSS {} KiB ≥ {bound} KiB (RSS before {rss0} KiB + ring hard cap {hard_cap_kib} KiB + 12 MiB)",
        peak.max(hwm)
    );
}

/// One session whose client stops reading (the daemon PAUSEs its agent output once the ring is
/// full) does not slow the others on the same link (1 shard: one link): a second session
/// completes 200 echo round trips meanwhile, and the paused one lost nothing.
#[test]
fn paused_session_does_not_stop_the_others_on_its_link() {
    for_configs(&[("epoll", 1), ("uring", 1)], |io, shards| {
        let dir = TempDir::with_sock("twoonlink");
        let agent = AgentProc::exec_sh(
            &dir.sock(),
            TENANT,
            AGENT,
            "read -r m; if [ \"$m\" = flood ]; then exec yes; else exec cat; fi",
        );
        let srv = Server::start(io, shards, &dir.sock(), &["--ring-bytes", "262144"]);
        let mut a = srv.session(AGENT);
        a.send_data(b"flood\n");
        let mut b = srv.session(AGENT);
        b.send_data(b"echo\n");
        // A's output fills its ring (never acknowledged) and its socket: PAUSE. Then `yes`
        // (exec'd by A's shell, a child of the agent) is blocked: it writes nothing more.
        std::thread::sleep(Duration::from_secs(1));
        let yes = child_named(agent.pid(), "yes").expect("the `yes` of session A");
        let written_before = wchar(yes);
        let mut rtts = Vec::new();
        for i in 0..200 {
            let msg = format!("rt-{i}\n");
            let t = Instant::now();
            b.send_data(msg.as_bytes());
            let echoed = b.recv_bytes(msg.len());
            rtts.push(t.elapsed());
            assert_eq!(echoed, msg.as_bytes(), "round trip {i}");
            b.ack(b.last_seq);
        }
        rtts.sort();
        let written_after = wchar(yes);
        println!(
            "[{io}/{shards}] 200 round trips next to a paused session: median {:?}, max {:?}; A's `yes` wrote {written_before} then {written_after} bytes",
            rtts[100], rtts[199]
        );
        assert_eq!(
            written_before, written_after,
            "session A's producer was not paused meanwhile"
        );
        // The paused session lost nothing: its output resumes, contiguous.
        let mut got = 0usize;
        while got < 4 << 20 {
            let f = a.recv();
            assert_eq!(f.ty, FrameType::Data, "{f:?}");
            check_yes(&f.payload, got);
            got += f.payload.len();
            a.ack(f.seq);
        }
    });
}

/// The pid of a child of `ppid` whose command name is `name`.
fn child_named(ppid: u32, name: &str) -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // pid (comm) state ppid ...
        let (comm, rest) = stat.split_once(" (")?.1.rsplit_once(") ")?;
        let parent: u32 = rest.split_whitespace().nth(1)?.parse().ok()?;
        (comm == name && parent == ppid).then_some(pid)
    })
}

/// Bytes process `pid` has written so far (`wchar` of /proc/PID/io).
fn wchar(pid: u32) -> u64 {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).expect("read /proc/PID/io");
    io.lines()
        .find_map(|l| l.strip_prefix("wchar: "))
        .and_then(|v| v.trim().parse().ok())
        .expect("wchar in /proc/PID/io")
}

/// Client input while the pod is lost is held up to 1 MiB per link; beyond that the daemon
/// stops reading the client (TCP back-pressure: its writes stall, its memory stays bounded).
/// When the pod is back, everything held and everything the client still had to write arrives
/// in order (echoed back by the pod), and the client is read again.
#[test]
fn input_held_while_pod_lost_is_bounded_then_delivered_in_order() {
    use std::io::Write as _;
    use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
    use std::sync::Arc;
    const FRAME: usize = 16 * 1024;
    const FRAMES: usize = 2048; // 32 MiB
    /// Payload of frame `i`: its number, then filler that depends on it.
    fn payload(i: usize) -> Vec<u8> {
        let mut p = format!("frame {i:06} ").into_bytes();
        let fill = b'a' + (i % 26) as u8;
        p.resize(FRAME, fill);
        p
    }
    for_configs(&CONFIGS, |io, shards| {
        let (dir, agent, srv) = echo_pod_and_server("heldin", io, shards, "60");
        let mut c = echoing_session(&srv);
        c.ack(c.last_seq);
        agent.kill9();
        std::thread::sleep(ms(300)); // let the daemon see the link's EOF
        c.set_send_buffer(64 * 1024);
        let rss0 = rss_kib(srv.pid()).unwrap();

        // The writer: every frame, then ACKs for what the reader has seen until told to stop.
        let written = Arc::new(AtomicUsize::new(0));
        let seen = Arc::new(AtomicU32::new(c.last_seq));
        let stop = Arc::new(AtomicBool::new(false));
        let writer = {
            let (written, seen, stop) = (written.clone(), seen.clone(), stop.clone());
            let mut w = c.try_clone_stream();
            w.set_write_timeout(None).unwrap();
            let (sid, mut seq) = (c.sid, c.tx_seq);
            std::thread::spawn(move || {
                let mut acked = 0u32;
                let mut out = Vec::new();
                let mut ack = |out: &mut Vec<u8>, seq: &mut u32| {
                    let s = seen.load(Ordering::SeqCst);
                    if s != acked {
                        acked = s;
                        *seq += 1;
                        clawterm::proto::encode_to_vec(
                            out,
                            sid,
                            *seq,
                            FrameType::Ack,
                            0,
                            &s.to_be_bytes(),
                        );
                    }
                };
                for i in 0..FRAMES {
                    out.clear();
                    seq += 1;
                    clawterm::proto::encode_to_vec(
                        &mut out,
                        sid,
                        seq,
                        FrameType::Data,
                        0,
                        &payload(i),
                    );
                    ack(&mut out, &mut seq);
                    w.write_all(&out).expect("write input");
                    written.fetch_add(1, Ordering::SeqCst);
                }
                while !stop.load(Ordering::SeqCst) {
                    out.clear();
                    ack(&mut out, &mut seq);
                    if !out.is_empty() && w.write_all(&out).is_err() {
                        return;
                    }
                    std::thread::sleep(ms(5));
                }
            })
        };

        // While the pod is lost the writer stalls: no progress for 1 s, well short of the end.
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut last = (0, Instant::now());
        loop {
            std::thread::sleep(ms(100));
            let n = written.load(Ordering::SeqCst);
            if n != last.0 {
                last = (n, Instant::now());
            } else if last.1.elapsed() >= Duration::from_secs(1) {
                break;
            }
            assert!(
                n < FRAMES,
                "all {FRAMES} frames ({} MiB) written while the pod was lost: the daemon kept reading",
                (FRAMES * FRAME) >> 20
            );
            assert!(Instant::now() < deadline, "the writer never stalled");
        }
        let stalled_at = written.load(Ordering::SeqCst);
        let rss_held = rss_kib(srv.pid()).unwrap();
        println!(
            "[{io}/{shards}] pod lost: the client's writes stalled after {stalled_at} frames ({:.1} MiB); clawtermd VmRSS {rss0} -> {rss_held} KiB",
            (stalled_at * FRAME) as f64 / 1048576.0
        );
        assert!(
            rss_held < rss0 + 8 * 1024,
            "clawtermd grew from {rss0} KiB to {rss_held} KiB holding input for a lost pod"
        );
        c.expect_silence(ms(200));

        // The pod is back: the held input, then the rest, echoed in order.
        let _agent = AgentProc::echo(&dir.sock(), TENANT, AGENT);
        let mut echoed = Vec::with_capacity(FRAMES * FRAME);
        let deadline = Instant::now() + Duration::from_secs(60);
        while echoed.len() < FRAMES * FRAME {
            assert!(
                Instant::now() < deadline,
                "only {} of {} bytes echoed after the pod came back",
                echoed.len(),
                FRAMES * FRAME
            );
            let f = c.recv_within(Duration::from_secs(10));
            assert_eq!(f.ty, FrameType::Data, "{f:?}");
            echoed.extend_from_slice(&f.payload);
            seen.store(f.seq, Ordering::SeqCst);
        }
        stop.store(true, Ordering::SeqCst);
        writer.join().expect("writer thread");
        assert_eq!(
            written.load(Ordering::SeqCst),
            FRAMES,
            "the client was read again"
        );
        assert_eq!(echoed.len(), FRAMES * FRAME);
        for (i, got) in echoed.chunks(FRAME).enumerate() {
            assert!(
                got == payload(i).as_slice(),
                "echoed frame {i} is not input frame {i}: starts {:?}",
                String::from_utf8_lossy(&got[..20])
            );
        }
    });
}

/// Shell output produced while the client is away survives, through clawtermd: a
/// `claw-agent shell` session runs `sleep 1; seq 1 100000` (about 690 KB through the
/// terminal), the client SUSPENDs at once, and after the output is done a RESUME replays it:
/// every line exactly once, in order, no GAP (--ring-bytes 2 MiB, so it all fits).
#[test]
fn shell_output_produced_while_away_arrives_exactly_once() {
    for_configs(&CONFIGS, |io, shards| {
        let dir = TempDir::with_sock("shellaway");
        let done = dir.0.join("done");
        let _agent = AgentProc::start(&dir.sock(), TENANT, AGENT, &["shell", "--shell", "/bin/sh"]);
        let srv = Server::start(io, shards, &dir.sock(), &["--ring-bytes", "2097152"]);
        let mut c = srv.session(AGENT);
        let (sid, token) = (c.sid, c.token);
        // Markers are computed by the shell, so the terminal's echo of the line never matches.
        c.send_data(
            format!(
                "sleep 1; echo START-$((1+1)); seq 1 100000; echo DONE-$((40+2)); touch {}\r",
                done.display()
            )
            .as_bytes(),
        );
        c.suspend();
        assert!(
            wait_until(Duration::from_secs(30), || done.exists()),
            "the command never finished"
        );
        std::thread::sleep(ms(500)); // the last output reaches the daemon
        let mut c = srv.client();
        let r = c.resume(sid, 1, &token);
        assert_eq!(r.flags & FLAG_GAP, 0, "RESUMED with GAP: {r:?}");
        assert_eq!(
            r.first_replay_seq, 2,
            "the replay starts at the first DATA: {r:?}"
        );
        let (mut replayed, mut all) = (0usize, Vec::new());
        let deadline = Instant::now() + Duration::from_secs(30);
        while !all.windows(9).any(|w| w == b"DONE-42\r\n") {
            assert!(Instant::now() < deadline, "no DONE-42 after 30 s");
            let f = c.recv_within(Duration::from_secs(10));
            assert_eq!(f.ty, FrameType::Data, "{f:?}");
            if f.flags & FLAG_REPLAY != 0 {
                replayed += f.payload.len();
            }
            all.extend_from_slice(&f.payload);
            c.ack(f.seq);
        }
        let text = String::from_utf8_lossy(&all);
        let start = text.find("START-2\r\n").expect("START-2 in the output") + 9;
        let end = start
            + text[start..]
                .find("DONE-42\r\n")
                .expect("DONE-42 after START-2");
        let lines: Vec<&str> = text[start..end].split_terminator("\r\n").collect();
        println!(
            "[{io}/{shards}] {} bytes after RESUME ({replayed} replayed), {} lines between the markers",
            all.len(),
            lines.len()
        );
        assert_eq!(lines.len(), 100_000, "line count");
        for (i, l) in lines.iter().enumerate() {
            assert_eq!(*l, (i + 1).to_string(), "line {}", i + 1);
        }
        assert!(
            replayed > 600_000,
            "only {replayed} bytes were replayed: the output was not produced while away"
        );
    });
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
    let dir = TempDir::with_sock(overflow);
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
        let dir = TempDir::with_sock("links");
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
                PodMsg::Hello { version: 2, name } => names.push(name.clone()),
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

/// A pod whose HELLO carries a version other than 1 or 2 is not spoken to: the daemon breaks
/// the link (the pod reads EOF) and logs a warning naming the version.
#[test]
fn pod_hello_with_another_version_breaks_the_link() {
    use clawterm::podlink::{self, Msg};
    use std::io::{ErrorKind, Read, Write};
    use std::os::unix::net::UnixListener;

    for_configs(&CONFIGS, |io, shards| {
        let dir = TempDir::with_sock("hello-v2");
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
                version: 3,
                name: "pod from the future",
            },
        );
        link.write_all(&hello).expect("send HELLO v3");
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
                msg: Msg::Hello { version: 2, .. },
                ..
            }) => {}
            other => panic!("the daemon's first message was not HELLO v2: {other:?}"),
        }
        assert!(
            wait_until(TIMEOUT, || srv
                .log()
                .iter()
                .any(|l| l.contains("WARN") && l.contains("unsupported version 3"))),
            "no warning naming version 3; log:\n{}",
            srv.log_tail(20)
        );
        drop(c);
    });
}
