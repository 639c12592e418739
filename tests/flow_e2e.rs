//! Flow control that never freezes (PROTOCOL.md §7.16–§7.17, POD-LINK.md §4), end to end with
//! real `clawtermd` and agent processes over TCP:
//!
//! * a client that never ACKs, and one that ACKs lazily, keep their agents running;
//! * a session paused while attached and then cut off gets CONTINUE under `--overflow drop`
//!   (and stays paused, losing nothing, under `--overflow pause`);
//! * a client flooding input without reading is held back by TCP, the pod's memory stays
//!   bounded, and another session on the same pod keeps echoing;
//! * outgoing DATA frames are at most `--max-send-payload` (16 KiB by default).

mod common;
use clawterm_testkit as harness;

use clawterm_agent::{Agent, AgentListener, OpenInfo, Outbox, SessionId};
use common::*;
use std::io::Write;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// Runs `f` on both backends (epoll with one shard, io_uring with two).
fn for_each_backend(f: impl Fn(Cfg)) {
    let cfgs = [CONFIGS[0], CONFIGS[3]];
    let failures = harness::failures_of(&cfgs, |c| format!("io={} shards={}", c.io, c.shards), f);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// `n` bytes of a pattern that differs for every `index`.
fn chunk(index: u32, n: usize) -> Vec<u8> {
    (0..n)
        .map(|i| (index as usize * 31 + i * 7 + (i >> 8)) as u8)
        .collect()
}

/// Writes DATA frames for `sid` from another thread, SEQs from `seq + 1`, each `size` bytes
/// of `chunk(i)`, `count` of them; between frames it writes the cumulative ACKs the reader
/// asks for on `acks` (so the reader never waits for the writer), and after the last frame it
/// keeps writing them until the reader drops its sender.
fn spawn_writer(
    mut w: TcpStream,
    mut seq: u32,
    sid: u32,
    count: u32,
    size: usize,
    acks: std::sync::mpsc::Receiver<u32>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let ack = |w: &mut TcpStream, seq: &mut u32, through: u32| {
            *seq = seq.wrapping_add(1);
            w.write_all(&encode(sid, *seq, ACK, 0, &through.to_be_bytes()))
        };
        for i in 0..count {
            while let Ok(through) = acks.try_recv() {
                if ack(&mut w, &mut seq, through).is_err() {
                    return;
                }
            }
            seq = seq.wrapping_add(1);
            if w.write_all(&encode(sid, seq, DATA, 0, &chunk(i, size)))
                .is_err()
            {
                return;
            }
        }
        while let Ok(through) = acks.recv() {
            if ack(&mut w, &mut seq, through).is_err() {
                return;
            }
        }
    })
}

// 1 -------------------------------------------------------------------------------------------

/// A v1 client (capabilities 0x01) that reads everything and never sends an ACK receives
/// 4 MiB through `claw-agent echo` without a stall (every frame within the harness's 5 s), and
/// after an abrupt loss its RESUME gets GAP and the newest output.
#[test]
fn a_client_that_never_acknowledges_receives_4_mib_without_a_stall() {
    for_each_backend(|cfg| {
        let env = Env::start(cfg, &[]);
        let mut c = env.session();
        let (sid, token) = (c.sid, c.resume_token);
        const N: u32 = 1024;
        const SIZE: usize = 4096;
        let (_no_acks, rx) = std::sync::mpsc::channel();
        let w = c.stream().try_clone().unwrap();
        let writer = spawn_writer(w, c.tx_seq, sid, N, SIZE, rx);
        let t0 = Instant::now();
        let mut slowest = Duration::ZERO;
        let mut last = 0;
        for i in 0..N {
            let t = Instant::now();
            let f = c.recv_data();
            slowest = slowest.max(t.elapsed());
            assert_eq!(f.seq, i + 2, "echo {i} out of order");
            assert!(f.payload == chunk(i, SIZE), "echo {i} differs");
            last = f.seq;
        }
        drop(_no_acks);
        writer.join().unwrap();
        println!(
            "{cfg:?}: 4 MiB to a client that never ACKs in {:?}; longest wait for a frame {slowest:?}",
            t0.elapsed()
        );
        // Abrupt loss; the RESUME asks for everything after the 10th echo.
        harness::reset(c.into_stream());
        std::thread::sleep(ms(100));
        let mut r = env.client();
        let res = r.resume(sid, 11, &token);
        assert_eq!(
            res.flags & F_GAP,
            F_GAP,
            "frames it asked for were dropped: {res:?}"
        );
        let first = res.first_replay_seq;
        // The ring (256 KiB) holds the newest 64 echoes.
        assert!(first > 11 && first + 64 > last, "{res:?} (last {last})");
        for seq in first..=last {
            let f = r.recv_data();
            assert_eq!((f.seq, f.flags), (seq, F_REPLAY), "{f:?}");
            assert!(f.payload == chunk(seq - 2, SIZE), "replay of {seq} differs");
        }
        r.echo(b"live again");
    });
}

// 2 -------------------------------------------------------------------------------------------

/// A RELIABLE client that sends one cumulative ACK every 16 DATA frames, on a 64 KiB ring with
/// 18 KB frames (fewer than 16 fit), reads 10 MB without a stall.
#[test]
fn a_lazily_acknowledging_client_reads_10_mb() {
    for_each_backend(|cfg| {
        let env = Env::start(
            cfg,
            &["--ring-bytes", "65536", "--max-send-payload", "18000"],
        );
        let mut c = env.client();
        c.send_connect_payload(&connect_payload(1, 0x03, TENANT, AGENT, &TOKEN));
        assert_eq!(c.recv_frame().typ, ACCEPT);
        let sid = c.sid;
        const N: u32 = 556; // 10,008,000 bytes
        const SIZE: usize = 18_000;
        let (acks, rx) = std::sync::mpsc::channel();
        let w = c.stream().try_clone().unwrap();
        let writer = spawn_writer(w, c.tx_seq, sid, N, SIZE, rx);
        let t0 = Instant::now();
        let mut slowest = Duration::ZERO;
        let mut bytes = 0usize;
        for i in 0..N {
            let t = Instant::now();
            let f = c.recv_data();
            slowest = slowest.max(t.elapsed());
            assert!(f.payload == chunk(i, SIZE), "echo {i} differs");
            bytes += f.payload.len();
            if i % 16 == 15 {
                acks.send(f.seq).unwrap();
            }
        }
        drop(acks);
        writer.join().unwrap();
        assert_eq!(bytes, 10_008_000);
        println!(
            "{cfg:?}: 10 MB to a client that ACKs every 16th frame in {:?}; longest wait {slowest:?}",
            t0.elapsed()
        );
        // The writer took the client's SEQs meanwhile.
        c.tx_seq += N + N / 16;
        c.echo(b"still here");
    });
}

// 3 -------------------------------------------------------------------------------------------

/// What the test pod saw, in order.
#[derive(Default)]
struct PodLog {
    events: Mutex<Vec<(Instant, &'static str)>>,
    /// DATA messages produced so far.
    produced: AtomicU64,
    stop: AtomicBool,
}

impl PodLog {
    fn push(&self, e: &'static str) {
        self.events.lock().unwrap().push((Instant::now(), e));
    }
    fn events(&self) -> Vec<(Instant, &'static str)> {
        self.events.lock().unwrap().clone()
    }
}

/// A pod that writes 4,000-byte DATA (numbered) as fast as the daemon lets it, and records the
/// daemon's PAUSE / CONTINUE / DETACHED / ATTACHED.
struct Producer(Arc<PodLog>);

/// The number a producer's DATA carries in its first 8 bytes.
fn produced_index(payload: &[u8]) -> u64 {
    u64::from_be_bytes(payload[..8].try_into().unwrap())
}

impl Agent for Producer {
    fn open(&mut self, s: SessionId, _info: &OpenInfo, out: &Outbox) {
        let (log, out) = (self.0.clone(), out.clone());
        std::thread::spawn(move || {
            // Bounded: 50,000 messages (200 MB) or the end of the test.
            for i in 0..50_000u64 {
                if log.stop.load(Ordering::SeqCst) || !out.wait_sendable(s) {
                    return;
                }
                let mut m = vec![b'p'; 4000];
                m[..8].copy_from_slice(&i.to_be_bytes());
                if out.data(s, &m).is_err() {
                    return;
                }
                log.produced.fetch_add(1, Ordering::SeqCst);
            }
        });
    }
    fn data(&mut self, _: SessionId, _: &[u8], _: &Outbox) {}
    fn pause(&mut self, _: SessionId, _: &Outbox) {
        self.0.push("PAUSE");
    }
    fn resume_output(&mut self, _: SessionId, _: &Outbox) {
        self.0.push("CONTINUE");
    }
    fn detached(&mut self, _: SessionId, _: &Outbox) {
        self.0.push("DETACHED");
    }
    fn attached(&mut self, _: SessionId, _: &Outbox) {
        self.0.push("ATTACHED");
    }
}

/// Serves a [`Producer`] pod for TENANT/`agent` on its own thread until `log.stop`.
fn start_producer(env: &Env, agent: u32, log: Arc<PodLog>) -> std::thread::JoinHandle<()> {
    let l = AgentListener::bind(&env.socket_dir(), TENANT, agent).expect("bind the test pod");
    std::thread::sleep(ms(150)); // POD-LINK.md §1: usable within 100 ms
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let log2 = log.clone();
    std::thread::spawn(move || {
        let watcher = std::thread::spawn(move || {
            while !log2.stop.load(Ordering::SeqCst) {
                std::thread::sleep(ms(20));
            }
            stop2.store(true, Ordering::SeqCst);
        });
        let _ = l.serve(move || Producer(log.clone()), stop);
        let _ = watcher.join();
    })
}

/// A client that CONNECTs and never reads (its receive buffer 4 KiB, so the kernel cannot
/// absorb the output), reset after 0.5 s. Returns the session's id and token.
fn connect_never_read_then_reset(env: &Env, agent: u32) -> (u32, [u8; 16]) {
    let s = harness::connect_with_rcvbuf(env.addr(), 4096).expect("connect");
    harness::set_client_opts(&s, TIMEOUT);
    let mut c = Client::from_stream(s);
    c.send_connect_payload(&connect_payload(1, 0x01, TENANT, agent, &TOKEN));
    assert_eq!(c.recv_frame().typ, ACCEPT);
    let ids = (c.sid, c.resume_token);
    std::thread::sleep(ms(500));
    harness::reset(c.into_stream());
    ids
}

/// POD-LINK.md §4 under `--overflow drop`: a session whose client stopped reading is PAUSEd;
/// once the client is cut off the pod gets CONTINUE right after DETACHED and keeps producing,
/// and the RESUME gets GAP and the newest output.
#[test]
fn paused_while_attached_then_cut_off_continues_under_drop() {
    for_each_backend(|cfg| {
        let env = Env::start(cfg, &["--ring-bytes", "65536"]);
        let log = Arc::new(PodLog::default());
        let pod = start_producer(&env, 3, log.clone());
        let (sid, token) = connect_never_read_then_reset(&env, 3);
        std::thread::sleep(ms(3000));
        let ev = log.events();
        let names: Vec<&str> = ev.iter().map(|e| e.1).collect();
        let d = names
            .iter()
            .position(|&e| e == "DETACHED")
            .unwrap_or_else(|| panic!("no DETACHED: {names:?}"));
        assert_eq!(names[..d].first(), Some(&"PAUSE"), "{names:?}");
        assert_eq!(names.get(d + 1), Some(&"CONTINUE"), "{names:?}");
        let after = ev[d + 1].0 - ev[d].0;
        assert!(after < ms(100), "CONTINUE {after:?} after DETACHED");
        std::thread::sleep(ms(200));
        let produced = log.produced.load(Ordering::SeqCst);
        println!("{cfg:?}: pod events {names:?}; produced {produced} messages (CONTINUE {after:?} after DETACHED)");
        assert!(produced > 1000, "the pod kept producing: {produced}");
        let mut r = env.client();
        let res = r.resume(sid, 1, &token);
        assert_eq!(res.flags & F_GAP, F_GAP, "{res:?}");
        assert!(res.first_replay_seq > 2, "{res:?}");
        // The replay is the newest output, contiguous, up to the last message produced (or, if
        // the pod is still producing, up to where live output takes over).
        let mut prev = None;
        loop {
            let f = r.recv_frame();
            if f.typ != DATA {
                continue;
            }
            let i = produced_index(&f.payload);
            if let Some(p) = prev {
                assert_eq!(i, p + 1, "replay not contiguous");
            }
            prev = Some(i);
            if f.flags & F_REPLAY == 0 || i + 1 >= produced {
                break;
            }
        }
        log.stop.store(true, Ordering::SeqCst);
        drop(r);
        drop(env);
        let _ = pod.join();
    });
}

/// The same under `--overflow pause`: the session stays paused once suspended (no CONTINUE,
/// nothing produced meanwhile) and the RESUME replays everything, no GAP.
#[test]
fn paused_while_attached_then_cut_off_stays_paused_under_pause() {
    for_each_backend(|cfg| {
        let env = Env::start(cfg, &["--ring-bytes", "65536", "--overflow", "pause"]);
        let log = Arc::new(PodLog::default());
        let pod = start_producer(&env, 3, log.clone());
        let (sid, token) = connect_never_read_then_reset(&env, 3);
        std::thread::sleep(ms(500));
        let before = log.produced.load(Ordering::SeqCst);
        std::thread::sleep(ms(2500));
        let produced = log.produced.load(Ordering::SeqCst);
        let names: Vec<&str> = log.events().iter().map(|e| e.1).collect();
        assert_eq!(names, ["PAUSE", "DETACHED"], "{names:?}");
        assert_eq!(produced, before, "nothing produced while paused");
        let mut r = env.client();
        let res = r.resume(sid, 1, &token);
        assert_eq!(res.flags & F_GAP, 0, "{res:?}");
        assert_eq!(res.first_replay_seq, 2, "{res:?}");
        // Everything the daemon got is replayed, from the first message on.
        let mut next = 0u64;
        let mut last_seq = 0;
        while let Event::Frame(f) = r.recv_event(ms(300)) {
            if f.typ == DATA {
                assert_eq!(f.flags, F_REPLAY, "{f:?}");
                assert_eq!(produced_index(&f.payload), next, "replay lost or reordered");
                next += 1;
                last_seq = f.seq;
            }
        }
        assert!(next > 10, "replayed {next} messages");
        // Acknowledged, the ring drains, the pod gets CONTINUE and carries on where it was.
        r.send(ACK, &last_seq.to_be_bytes());
        for _ in 0..20 {
            let f = r.recv_data();
            assert_eq!(f.flags, 0);
            assert_eq!(
                produced_index(&f.payload),
                next,
                "output lost after CONTINUE"
            );
            next += 1;
        }
        println!("{cfg:?}: pod events {names:?}; {produced} messages produced before the RESUME");
        log.stop.store(true, Ordering::SeqCst);
        drop(r);
        drop(env);
        let _ = pod.join();
    });
}

// 4 -------------------------------------------------------------------------------------------

/// A client that sends DATA without ever reading: `claw-agent echo` PAUSEs its input, the
/// daemon stops reading it (its writes block: TCP pushes back), the pod's memory stays bounded,
/// and a second session on the same pod keeps echoing.
#[test]
fn a_client_flooding_input_is_held_back_and_the_pod_stays_bounded() {
    for_each_backend(|cfg| {
        let env = Env::start(cfg, &[]);
        let pod = env.agent.pid();
        let rss0 = harness::rss_kib(pod).unwrap_or(0);
        let flood = env.session();
        let mut other = env.session();
        other.echo(b"warm-up");
        let sid = flood.sid;
        let mut s = flood.stream().try_clone().unwrap();
        s.set_write_timeout(Some(ms(1000))).unwrap();
        let first = flood.tx_seq;
        let flooder = std::thread::spawn(move || {
            // Bounded: at most 256 MiB; a write that blocks for 1 s means TCP pushed back.
            let payload = vec![b'f'; 16 * 1024];
            let mut sent = 0usize;
            for i in 1..=16_384u32 {
                if s.write_all(&encode(sid, first + i, DATA, 0, &payload))
                    .is_err()
                {
                    return (sent, true);
                }
                sent += payload.len();
            }
            (sent, false)
        });
        let mut peak = rss0;
        let mut worst = Duration::ZERO;
        let mut total = Duration::ZERO;
        let n = 40;
        for i in 0..n {
            let t = Instant::now();
            other.echo(format!("ping {i}").as_bytes());
            let d = t.elapsed();
            worst = worst.max(d);
            total += d;
            peak = peak.max(harness::rss_kib(pod).unwrap_or(0));
            std::thread::sleep(ms(50));
        }
        let (sent, blocked) = flooder.join().unwrap();
        peak = peak.max(harness::rss_kib(pod).unwrap_or(0));
        println!(
            "{cfg:?}: flood of {} MiB before TCP held it back; claw-agent echo VmRSS {rss0} KiB -> peak {peak} KiB; other session's echo mean {:?}, worst {worst:?}",
            sent >> 20,
            total / n
        );
        assert!(
            blocked,
            "the flooding client was never held back ({sent} bytes written)"
        );
        assert!(
            peak < rss0 + 32 * 1024,
            "claw-agent grew from {rss0} KiB to {peak} KiB"
        );
        drop(flood);
    });
}

// 5 -------------------------------------------------------------------------------------------

/// §7.17: with default options no DATA frame exceeds 16 KiB, whatever the agent writes in one
/// go; with `--max-send-payload` raised, frames up to `--max-payload` go out.
#[test]
fn outgoing_data_frames_are_at_most_max_send_payload() {
    for_each_backend(|cfg| {
        let env = Env::start(cfg, &[]);
        let mut c = env.session();
        let big = chunk(7, 60_000);
        c.send_data(&big);
        let mut got = Vec::new();
        let mut sizes = Vec::new();
        while got.len() < big.len() {
            let f = c.recv_data();
            sizes.push(f.payload.len());
            got.extend_from_slice(&f.payload);
        }
        assert_eq!(got, big);
        assert_eq!(sizes, [16384, 16384, 16384, 10848]);

        let env = Env::start(cfg, &["--max-send-payload", "65535"]);
        let mut c = env.session();
        c.send_data(&big);
        let f = c.recv_data();
        assert_eq!(f.payload, big, "one frame of 60,000 bytes");
    });
}

// 6 -------------------------------------------------------------------------------------------

/// A pod that PAUSEd a session's input and then died takes its PAUSE with it: once a new pod
/// is back (REOPEN), the client's input flows again.
#[test]
fn an_input_pause_ends_with_the_pod_that_sent_it() {
    for_each_backend(|cfg| {
        let env = Env::start(cfg, &[]);
        let stuck = env.extra_agent(4, &["exec", "--", "sleep", "100"]);
        let mut c = env.client();
        c.send_connect_payload(&connect_payload(1, 0x01, TENANT, 4, &TOKEN));
        assert_eq!(c.recv_frame().typ, ACCEPT);
        let sid = c.sid;
        // Flood until TCP holds the client back (the pod PAUSEd the input). Written by hand so
        // that the part of the last frame the kernel did not take is known.
        let mut w = c.stream().try_clone().unwrap();
        w.set_write_timeout(Some(ms(1000))).unwrap();
        let payload = vec![b'i'; 16 * 1024];
        let mut seq = c.tx_seq;
        let mut rest = Vec::new();
        'flood: for _ in 0..16_384 {
            seq += 1;
            let frame = encode(sid, seq, DATA, 0, &payload);
            let mut at = 0;
            while at < frame.len() {
                match w.write(&frame[at..]) {
                    Ok(n) => at += n,
                    Err(_) => {
                        rest = frame[at..].to_vec();
                        break 'flood;
                    }
                }
            }
        }
        assert!(!rest.is_empty(), "the input was never paused");
        // The pod dies; an echo pod takes its place within the grace period.
        drop(stuck);
        let echo = env.extra_agent(4, &["echo"]);
        // The rest of the frame that was cut, then a marker: the echo pod returns both.
        let marker = b"marker after the pod came back";
        let writer = std::thread::spawn(move || {
            w.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
            rest.extend(encode(sid, seq + 1, DATA, 0, marker));
            w.write_all(&rest).is_ok()
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut tail = Vec::new();
        loop {
            assert!(Instant::now() < deadline, "input never flowed again");
            match c.recv_event(ms(500)) {
                Event::Frame(f) if f.typ == DATA => {
                    tail.extend_from_slice(&f.payload);
                    if harness::contains(&tail, marker) {
                        break;
                    }
                    if tail.len() > 64 {
                        tail.drain(..tail.len() - 64);
                    }
                }
                Event::Frame(_) | Event::Timeout => {}
                Event::Closed => panic!("connection closed"),
            }
        }
        assert!(writer.join().unwrap(), "the marker could not be written");
        drop(echo);
    });
}
