//! The shard handler without sockets: every shard of a node driven by the simulated runtime
//! (`clawterm::server::sim`), clients played by the real sans-IO client core, pods by plain
//! data. Each scenario runs in milliseconds, with a clock that moves only when told.

use clawterm::podlink::Msg as PodMsg;
use clawterm::proto::{self, ErrorCode, FrameType};
use clawterm::server::sim::Sim;
use clawterm::server::ServerConfig;
use clawterm::session::{Overflow, SessionConfig};
use clawterm_client::core::{ClientCore, CoreEvent};
use std::time::Duration;

const TENANT: u32 = 7;
const AGENT: u32 = 42;

/// A client: the client core on a simulated connection.
struct Client {
    core: ClientCore,
    conn: usize,
    events: Vec<CoreEvent>,
    data: Vec<u8>,
    /// Frames received, counted by decoding what arrived.
    frames_in: u64,
}

impl Client {
    fn connect(sim: &mut Sim, shard: usize) -> Client {
        let mut core = ClientCore::new(TENANT, AGENT, [0xAB; 32]);
        let conn = sim.connect(shard);
        core.start_connect([1; 16], sim.now_ms());
        let mut c = Client {
            core,
            conn,
            events: Vec::new(),
            data: Vec::new(),
            frames_in: 0,
        };
        c.pump(sim);
        c
    }

    /// Moves bytes both ways until neither side has anything left.
    fn pump(&mut self, sim: &mut Sim) {
        for _ in 0..1000 {
            let out = self.core.take_output();
            let inbound = sim.client_take(self.conn);
            if out.is_empty() && inbound.is_empty() {
                return;
            }
            if !out.is_empty() {
                sim.client_send(self.conn, &out);
            }
            if !inbound.is_empty() {
                self.frames_in += frame_count(&inbound);
                self.core
                    .on_bytes(&inbound, sim.now_ms())
                    .expect("the server sends well-formed frames");
            }
            while let Some(ev) = self.core.poll_event() {
                if let CoreEvent::Data(d) = &ev {
                    self.data.extend_from_slice(d);
                }
                self.events.push(ev);
            }
        }
        panic!("client and server kept talking");
    }

    fn send(&mut self, sim: &mut Sim, bytes: &[u8]) {
        self.core.send_data(bytes, sim.now_ms());
        self.pump(sim);
    }

    /// The connection drops; the same client resumes on a new connection to `shard`.
    fn resume_on(&mut self, sim: &mut Sim, shard: usize) {
        sim.client_drop(self.conn);
        self.core.connection_lost();
        self.conn = sim.connect(shard);
        self.core.start_resume(sim.now_ms());
        self.pump(sim);
    }

    fn accepted(&self) -> bool {
        self.events
            .iter()
            .any(|e| matches!(e, CoreEvent::Accepted { .. }))
    }
}

fn cfg(shards: usize) -> ServerConfig {
    ServerConfig {
        shards,
        cpus: vec![None; shards],
        ..ServerConfig::default()
    }
}

fn node(shards: usize) -> Sim {
    node_with(cfg(shards))
}

fn node_with(cfg: ServerConfig) -> Sim {
    let mut sim = Sim::new(cfg);
    sim.add_pod(TENANT, AGENT, true);
    sim
}

/// The whole frames in a stream of server frames (the simulation delivers whole frames).
fn frame_count(mut bytes: &[u8]) -> u64 {
    let mut n = 0;
    while let Ok(proto::Decoded::Frame(_, used)) = proto::decode(bytes, proto::MAX_PAYLOAD) {
        n += 1;
        bytes = &bytes[used..];
    }
    n
}

/// A counter summed over the node's shards.
fn total(sim: &Sim, f: impl Fn(&clawterm::server::metrics::ShardMetrics) -> u64) -> u64 {
    sim.shared.metrics.shards.iter().map(f).sum()
}

/// The ERROR codes in a stream of server frames.
fn error_codes(mut bytes: &[u8]) -> Vec<u16> {
    let mut codes = Vec::new();
    while let Ok(proto::Decoded::Frame(f, used)) = proto::decode(bytes, proto::MAX_PAYLOAD) {
        if f.ty == FrameType::Error {
            codes.push(u16::from_be_bytes([f.payload[0], f.payload[1]]));
        }
        bytes = &bytes[used..];
    }
    codes
}

/// CONNECT opens a session on the shard that accepted it, the pod gets OPEN, and input and
/// output flow through the pod link in order.
#[test]
fn handshake_opens_a_session_and_data_flows() {
    let mut sim = node(2);
    let mut c = Client::connect(&mut sim, 1);
    assert!(c.accepted(), "{:?}", c.events);
    let sid = c.core.session_id();
    assert_eq!(
        sim.shard_of(sid),
        1,
        "a session lives on the shard that took its CONNECT"
    );
    assert_eq!(sim.pods[&(TENANT, AGENT)].opened, vec![sid]);
    c.send(&mut sim, b"hello ");
    c.send(&mut sim, b"world");
    assert_eq!(sim.pods[&(TENANT, AGENT)].input[&sid], b"hello world");
    assert_eq!(c.data, b"hello world", "the echo pod answered in order");
    // What was sent is counted where it was sent: every frame the client got, no other.
    let out = total(&sim, |m| {
        m.frames_out.load(std::sync::atomic::Ordering::Relaxed)
    });
    assert_eq!(out, c.frames_in);
    assert!(
        c.frames_in >= 3,
        "ACCEPT, ACKs and two DATA: {}",
        c.frames_in
    );
    assert_eq!(
        sim.shared
            .sessions
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
}

/// Migration messages from a pod never hurt a shard: a STATE for a session that is not being
/// exported is ignored (the roam code takes it when one is), and so is an EXPORT (daemon → pod
/// only) or a STATE for a session that does not exist; the link stays up and the session goes
/// on. (The simulated pod says HELLO version 1.)
#[test]
fn stray_migration_messages_from_a_pod_are_ignored() {
    let mut sim = node(1);
    let mut c = Client::connect(&mut sim, 0);
    assert!(c.accepted(), "{:?}", c.events);
    let sid = c.core.session_id();
    c.send(&mut sim, b"before ");
    assert!(sim.pod_send(TENANT, AGENT, sid, &PodMsg::State(b"soul")));
    assert!(sim.pod_send(TENANT, AGENT, sid, &PodMsg::State(b"")));
    assert!(sim.pod_send(TENANT, AGENT, sid, &PodMsg::Export));
    assert!(sim.pod_send(TENANT, AGENT, sid ^ 0x10, &PodMsg::State(b"x")));
    c.send(&mut sim, b"after");
    assert_eq!(
        c.data, b"before after",
        "the session goes on, nothing else reached it"
    );
    assert_eq!(sim.pods[&(TENANT, AGENT)].input[&sid], b"before after");
}

/// A first frame that is neither CONNECT nor RESUME is refused with ERROR and the connection
/// closed; a connection that says nothing is cut at the handshake deadline; a CONNECT for a
/// pod that is not there gets NO_AGENT.
#[test]
fn handshake_refusals_and_deadline() {
    let mut sim = node(1);
    let bad = sim.connect(0);
    let mut ping = Vec::new();
    proto::frame::encode_with(&mut ping, 0, 0, FrameType::Keepalive, 0, |_| {});
    sim.client_send(bad, &ping);
    assert_eq!(
        error_codes(&sim.client_take(bad)),
        vec![ErrorCode::ProtocolViolation as u16]
    );
    assert!(!sim.client_open(bad));

    let silent = sim.connect(0);
    let handshake = Duration::from_millis(sim.shared.cfg.handshake_ms);
    sim.advance(
        handshake - Duration::from_millis(10),
        Duration::from_millis(50),
    );
    assert!(sim.client_open(silent), "not before the deadline");
    sim.advance(Duration::from_millis(20), Duration::from_millis(5));
    assert!(!sim.client_open(silent), "cut at the handshake deadline");

    let mut core = ClientCore::new(TENANT, 99, [0xAB; 32]);
    let c = sim.connect(0);
    core.start_connect([2; 16], sim.now_ms());
    sim.client_send(c, &core.take_output());
    assert_eq!(
        error_codes(&sim.client_take(c)),
        vec![ErrorCode::NoAgent as u16]
    );
    let errors = |code: ErrorCode| {
        total(&sim, |m| {
            m.errors[code as usize].load(std::sync::atomic::Ordering::Relaxed)
        })
    };
    assert_eq!(errors(ErrorCode::ProtocolViolation), 1);
    assert_eq!(errors(ErrorCode::NoAgent), 1);
    assert_eq!(
        total(&sim, |m| m
            .frames_out
            .load(std::sync::atomic::Ordering::Relaxed)),
        2,
        "the two refusals; nothing to the silent connection"
    );
}

/// The newest RESUME wins: the attached connection gets TAKEN_OVER and is closed, the new one
/// carries the session on, and the agent is not told anything happened.
#[test]
fn takeover_moves_the_session_to_the_newest_connection() {
    let mut sim = node(2);
    let mut a = Client::connect(&mut sim, 0);
    let sid = a.core.session_id();
    a.send(&mut sim, b"one");
    let mut b = Client {
        core: ClientCore::for_resume(
            TENANT,
            AGENT,
            sid,
            a.core.resume_token(),
            a.core.last_seq(),
            a.core.next_seq(),
        ),
        conn: sim.connect(0),
        events: Vec::new(),
        data: Vec::new(),
        frames_in: 0,
    };
    b.core.start_resume(sim.now_ms());
    let b_out = b.core.take_output();
    sim.client_send(b.conn, &b_out);
    assert_eq!(
        error_codes(&sim.client_take(a.conn)),
        vec![ErrorCode::TakenOver as u16]
    );
    assert!(!sim.client_open(a.conn), "the old connection is closed");
    b.pump(&mut sim);
    assert!(
        b.events
            .iter()
            .any(|e| matches!(e, CoreEvent::Resumed { gap: false, .. })),
        "{:?}",
        b.events
    );
    b.send(&mut sim, b"two");
    assert_eq!(b.data, b"two");
    assert_eq!(sim.pods[&(TENANT, AGENT)].input[&sid], b"onetwo");
    assert!(
        !sim.pods[&(TENANT, AGENT)]
            .events
            .get(&sid)
            .is_some_and(|e| e.contains(&"DETACHED")),
        "a take-over is not a detach"
    );
}

/// A RESUME that lands on a shard that does not own the session is handed to the owner with
/// its connection; what the agent wrote while the client was away is replayed exactly once.
#[test]
fn cross_shard_resume_replays_what_was_missed() {
    let mut sim = node(2);
    let mut c = Client::connect(&mut sim, 0);
    let sid = c.core.session_id();
    c.send(&mut sim, b"before ");
    sim.client_drop(c.conn);
    c.core.connection_lost();
    assert!(sim.pod_send(TENANT, AGENT, sid, &PodMsg::Data(b"while away")));
    assert_eq!(
        sim.pods[&(TENANT, AGENT)].events[&sid],
        vec!["DETACHED"],
        "the pod heard of the detach"
    );
    c.conn = sim.connect(1);
    c.core.start_resume(sim.now_ms());
    c.pump(&mut sim);
    assert!(
        c.events
            .iter()
            .any(|e| matches!(e, CoreEvent::Resumed { gap: false, .. })),
        "{:?}",
        c.events
    );
    assert_eq!(
        c.data, b"before while away",
        "missed output replayed exactly once"
    );
    assert_eq!(
        sim.pods[&(TENANT, AGENT)].events[&sid],
        vec!["DETACHED", "ATTACHED"]
    );
    c.send(&mut sim, b"!");
    assert_eq!(c.data, b"before while away!");
    let m = &sim.shared.metrics.shards[0];
    assert_eq!(
        m.resumes_cross_shard
            .load(std::sync::atomic::Ordering::Relaxed)
            + sim.shared.metrics.shards[1]
                .resumes_cross_shard
                .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    // And back to the owner directly: a same-shard resume.
    c.resume_on(&mut sim, 0);
    c.send(&mut sim, b"?");
    assert_eq!(c.data, b"before while away!?");
}

/// A pod link that breaks while the pod's socket stays (a pod restarting in place): the
/// session waits, input is held, the shard reconnects by itself with HELLO and REOPEN, and the
/// held input reaches the pod in order. A pod gone for longer than the grace period ends the
/// session with AGENT_GONE.
#[test]
fn pod_loss_and_return() {
    let mut sim = node(1);
    let mut c = Client::connect(&mut sim, 0);
    let sid = c.core.session_id();
    c.send(&mut sim, b"a");
    sim.break_pod_link(TENANT, AGENT, 0);
    c.send(&mut sim, b"b");
    assert_eq!(
        sim.pods[&(TENANT, AGENT)].input[&sid],
        b"a",
        "held while the pod is away"
    );
    assert!(sim.client_open(c.conn), "the client stays attached");
    // The retry timer reconnects (the socket is still registered).
    sim.advance(Duration::from_millis(200), Duration::from_millis(10));
    c.pump(&mut sim);
    let pod = &sim.pods[&(TENANT, AGENT)];
    assert_eq!(pod.reopened, vec![sid], "REOPEN after the link came back");
    assert_eq!(pod.input[&sid], b"ab", "held input delivered in order");
    assert_eq!(c.data, b"ab");

    // Now the pod goes for good.
    sim.remove_pod(TENANT, AGENT);
    let grace = Duration::from_millis(sim.shared.cfg.agent_grace_ms);
    sim.advance(
        grace + Duration::from_millis(100),
        Duration::from_millis(500),
    );
    let last = sim.client_take(c.conn);
    assert_eq!(error_codes(&last), vec![ErrorCode::AgentGone as u16]);
    assert!(
        !sim.client_open(c.conn),
        "the session ended and its connection closed"
    );
    c.core.on_bytes(&last, sim.now_ms()).expect("well-formed");
    assert!(c.core.is_closed());
    assert_eq!(
        sim.shared
            .sessions
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
}

/// A suspended session whose agent writes more than its ring holds keeps the newest output;
/// the RESUME that asks for what was dropped gets RESUMED with GAP. Under `--overflow pause`
/// nothing is dropped: the agent is PAUSEd until the client acknowledges.
#[test]
fn overflow_drops_with_gap_or_pauses() {
    let ring = 4096;
    let mut sim = node_with(ServerConfig {
        session: SessionConfig {
            ring_bytes: ring,
            ..SessionConfig::default()
        },
        ..cfg(1)
    });
    let mut c = Client::connect(&mut sim, 0);
    let sid = c.core.session_id();
    sim.client_drop(c.conn);
    c.core.connection_lost();
    let chunk = vec![b'x'; 1024];
    for _ in 0..(3 * ring / chunk.len()) {
        sim.pod_send(TENANT, AGENT, sid, &PodMsg::Data(&chunk));
    }
    c.conn = sim.connect(0);
    c.core.start_resume(sim.now_ms());
    c.pump(&mut sim);
    assert!(
        c.events
            .iter()
            .any(|e| matches!(e, CoreEvent::Resumed { gap: true, .. })),
        "{:?}",
        c.events
    );
    assert!(
        c.data.len() <= ring && !c.data.is_empty(),
        "{}",
        c.data.len()
    );
    assert!(
        sim.shared.metrics.shards[0]
            .dropped_suspended
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
    );

    // Pause: the ring fills while the client does not acknowledge.
    let mut sim = node_with(ServerConfig {
        session: SessionConfig {
            ring_bytes: ring,
            overflow: Overflow::Pause,
            ..SessionConfig::default()
        },
        ..cfg(1)
    });
    let mut c = Client::connect(&mut sim, 0);
    let sid = c.core.session_id();
    for _ in 0..(2 * ring / chunk.len()) {
        sim.pod_send(TENANT, AGENT, sid, &PodMsg::Data(&chunk));
    }
    assert_eq!(
        sim.pods[&(TENANT, AGENT)].events[&sid],
        vec!["PAUSE"],
        "the agent is paused, nothing dropped"
    );
    // The client reads and acknowledges (its ACK timer): the agent may go on.
    sim.advance(Duration::from_millis(300), Duration::from_millis(10));
    c.pump(&mut sim);
    let now = sim.now_ms();
    c.core.tick(now);
    c.pump(&mut sim);
    assert_eq!(
        sim.pods[&(TENANT, AGENT)].events[&sid],
        vec!["PAUSE", "CONTINUE"]
    );
    assert_eq!(c.data.len(), 2 * ring, "every byte arrived");
}

/// A live upgrade, simulated: sessions (attached and suspended), client connections and pod
/// links move to a new process. Attached clients keep their connections and SEQ numbering (no
/// RESUME), pod output that had reached the link but was not read yet reaches its client
/// after the move exactly once (the new shard binds every connection before processing what
/// was in flight), and a suspended session resumes there with its replay.
#[test]
fn live_upgrade_moves_sessions_connections_and_links() {
    let mut sim = node(2);
    let mut a = Client::connect(&mut sim, 0);
    let mut b = Client::connect(&mut sim, 1);
    assert!(a.accepted() && b.accepted());
    a.send(&mut sim, b"one;");
    b.send(&mut sim, b"uno;");
    assert_eq!(a.data, b"one;");
    // b leaves; output for it waits in its ring.
    sim.client_drop(b.conn);
    b.core.connection_lost();
    let (sa, sb) = (a.core.session_id(), b.core.session_id());
    sim.pod_send(TENANT, AGENT, sb, &PodMsg::Data(b"while away;"));
    // Output for a that has reached the pod link but not been read when the upgrade starts.
    sim.pod_send_unread(TENANT, AGENT, sa, &PodMsg::Data(b"in flight;"));
    let seq_before = a.core.last_seq();

    let mut sim = sim.upgrade();
    a.pump(&mut sim);
    assert!(sim.client_open(a.conn), "the attached connection moved");
    assert_eq!(a.data, b"one;in flight;", "in-flight output arrives once");
    assert!(a.core.last_seq() > seq_before);
    a.send(&mut sim, b"two;");
    assert_eq!(a.data, b"one;in flight;two;");
    assert!(
        !a.events
            .iter()
            .any(|e| matches!(e, CoreEvent::Resumed { .. })),
        "no RESUME for a moved connection: {:?}",
        a.events
    );
    b.conn = sim.connect(1);
    b.core.start_resume(sim.now_ms());
    b.pump(&mut sim);
    assert_eq!(
        b.data, b"uno;while away;",
        "the suspended session replays after the move"
    );
    b.send(&mut sim, b"dos;");
    assert_eq!(b.data, b"uno;while away;dos;");
    // The pod saw no REOPEN: its link moved as it was.
    assert!(sim.pods[&(TENANT, AGENT)].reopened.is_empty());
}
