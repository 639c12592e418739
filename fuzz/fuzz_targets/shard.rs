//! Fuzzes a whole node's shard handlers in the simulated runtime (`clawterm::server::sim`):
//! the input is a script of events — clients (the real client core) connecting to any shard,
//! sending, dropping, resuming on another shard (hand-off), raw garbage on a connection, the
//! pod writing, pausing, losing its link, going away and coming back, a client's send queue
//! backing up, the clock moving. Checks:
//! * no panic and no stall (the simulation panics when a node keeps itself busy forever);
//! * an honest client (one that never had garbage injected on its connection) always gets
//!   well-formed frames its core accepts;
//! * the node never counts more sessions than it accepted CONNECTs.
#![no_main]

use clawterm::podlink::Msg as PodMsg;
use clawterm::server::sim::Sim;
use clawterm::server::ServerConfig;
use clawterm::session::{Overflow, SessionConfig};
use clawterm_client::core::{ClientCore, CoreEvent};
use libfuzzer_sys::fuzz_target;
use std::sync::atomic::Ordering;
use std::time::Duration;

const T: u32 = 7;
const A: u32 = 42;

struct C {
    core: ClientCore,
    conn: usize,
    honest: bool,
}

fn pump(sim: &mut Sim, c: &mut C, accepted: &mut usize) {
    for _ in 0..64 {
        let out = c.core.take_output();
        let inbound = sim.client_take(c.conn);
        if out.is_empty() && inbound.is_empty() {
            return;
        }
        if !out.is_empty() {
            sim.client_send(c.conn, &out);
        }
        if !inbound.is_empty() {
            let r = c.core.on_bytes(&inbound, sim.now_ms());
            if c.honest {
                assert!(r.is_ok(), "honest client got a bad stream: {r:?}");
            }
        }
        while let Some(ev) = c.core.poll_event() {
            if matches!(ev, CoreEvent::Accepted { .. }) {
                *accepted += 1;
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&head, mut script)) = data.split_first() else {
        return;
    };
    let shards = 1 + (head & 1) as usize;
    let session = SessionConfig {
        ring_bytes: 2048,
        ack_wait_ms: 50,
        overflow: if head & 2 != 0 { Overflow::Pause } else { Overflow::Drop },
        ..SessionConfig::default()
    };
    let cfg = ServerConfig {
        shards,
        cpus: vec![None; shards],
        session,
        agent_grace_ms: 500,
        handshake_ms: 1000,
        ..ServerConfig::default()
    };
    let mut sim = Sim::new(cfg);
    sim.add_pod(T, A, head & 4 != 0);
    let mut pod_here = true;
    let mut clients: Vec<C> = Vec::new();
    let mut accepted = 0usize;
    let mut steps = 0;
    while let [op, arg, rest @ ..] = script {
        script = rest;
        steps += 1;
        if steps > 64 {
            break;
        }
        let pick = |n: usize| (*arg as usize) % n.max(1);
        match op % 12 {
            0 if clients.len() < 8 => {
                let shard = pick(shards);
                let conn = sim.connect(shard);
                let mut core = ClientCore::new(T, A, [0xAB; 32]);
                core.start_connect([*arg; 16], sim.now_ms());
                clients.push(C { core, conn, honest: true });
            }
            1 if !clients.is_empty() => {
                let i = pick(clients.len());
                let n = 1 + (*arg as usize) * 16;
                let now = sim.now_ms();
                clients[i].core.send_data(&vec![b'i'; n], now);
            }
            2 if !clients.is_empty() => {
                let i = pick(clients.len());
                sim.client_drop(clients[i].conn);
                clients[i].core.connection_lost();
            }
            3 if !clients.is_empty() => {
                let i = pick(clients.len());
                let c = &mut clients[i];
                if c.core.has_session() && !c.core.is_closed() {
                    sim.client_drop(c.conn);
                    c.core.connection_lost();
                    c.conn = sim.connect((*arg as usize / 8) % shards);
                    c.core.start_resume(sim.now_ms());
                }
            }
            4 => {
                // Raw bytes from the script on a connection.
                let n = (*arg as usize % 24).min(script.len());
                let (junk, r) = script.split_at(n);
                script = r;
                if clients.is_empty() || arg & 1 == 0 {
                    let conn = sim.connect(pick(shards));
                    sim.client_send(conn, junk);
                } else {
                    let i = pick(clients.len());
                    clients[i].honest = false;
                    sim.client_send(clients[i].conn, junk);
                }
            }
            5 if !clients.is_empty() => {
                let i = pick(clients.len());
                let sid = clients[i].core.session_id();
                if sid != 0 {
                    let n = 1 + (*arg as usize) * 24;
                    sim.pod_send(T, A, sid, &PodMsg::Data(&vec![b'o'; n]));
                }
            }
            6 => sim.break_pod_link(T, A, pick(shards)),
            7 => {
                if pod_here {
                    sim.remove_pod(T, A);
                } else {
                    sim.add_pod(T, A, arg & 1 == 0);
                }
                pod_here = !pod_here;
            }
            8 => sim.advance(
                Duration::from_millis(u64::from(*arg) * 10),
                Duration::from_millis(25),
            ),
            9 if !clients.is_empty() => {
                let i = pick(clients.len());
                let now = sim.now_ms();
                clients[i].core.tick(now);
            }
            10 if !clients.is_empty() => {
                let i = pick(clients.len());
                let sid = clients[i].core.session_id();
                if sid != 0 {
                    let m = if arg & 1 == 0 { PodMsg::Pause } else { PodMsg::Continue };
                    sim.pod_send(T, A, sid, &m);
                }
            }
            11 if !clients.is_empty() => {
                let i = pick(clients.len());
                sim.client_backlog(clients[i].conn, (*arg as usize) * 100, arg & 1 == 1);
            }
            _ => {}
        }
        for c in clients.iter_mut() {
            pump(&mut sim, c, &mut accepted);
        }
        assert!(
            sim.shared.sessions.load(Ordering::Relaxed) <= accepted.max(clients.len()),
            "more sessions than CONNECTs"
        );
    }
    sim.shutdown();
});
