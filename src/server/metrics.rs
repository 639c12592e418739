//! Node metrics in Prometheus text format.
//!
//! Each shard owns one [`ShardMetrics`] and is its only writer (relaxed atomics: no contention,
//! no lock on the data path); the admin endpoint reads them all when scraped. The session,
//! connection, pod-link and ring-bytes gauges are refreshed by each shard once a second.
//!
//! Liveness: each shard thread registers with [`Metrics::watch_shard_thread`]; when the thread
//! ends for any reason (a panic included) it is counted, and [`Metrics::health`] fails unless
//! the operator asked the server to stop.

use crate::proto::ErrorCode;
use std::cell::RefCell;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;

/// Upper bounds (seconds) of the latency histogram buckets.
pub const BUCKETS: [f64; 14] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0,
];

/// A latency histogram with fixed buckets and atomic counts.
#[derive(Default)]
pub struct Histogram {
    counts: [AtomicU64; BUCKETS.len() + 1],
    sum_us: AtomicU64,
}

impl Histogram {
    /// Records one observation of `us` microseconds.
    pub fn observe_us(&self, us: u64) {
        let secs = us as f64 / 1e6;
        let i = BUCKETS
            .iter()
            .position(|&b| secs <= b)
            .unwrap_or(BUCKETS.len());
        self.counts[i].fetch_add(1, Relaxed);
        self.sum_us.fetch_add(us, Relaxed);
    }
}

/// The counters and gauges of one shard.
#[derive(Default)]
pub struct ShardMetrics {
    pub sessions_attached: AtomicU64,
    pub sessions_suspended: AtomicU64,
    pub connections: AtomicU64,
    pub frames_in: AtomicU64,
    pub frames_out: AtomicU64,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    /// Indexed by ERROR code (1..=12); 0 unused.
    pub errors: [AtomicU64; 13],
    pub unknown_frames: AtomicU64,
    pub resumes_same_shard: AtomicU64,
    pub resumes_cross_shard: AtomicU64,
    pub replay_bytes: AtomicU64,
    pub ring_bytes: AtomicU64,
    pub pod_links: AtomicU64,
    /// QUIC connections on this shard (gauge).
    pub quic_connections: AtomicU64,
    /// QUIC datagrams that reached this shard but belonged to another (no steering program).
    pub quic_forwarded: AtomicU64,
    /// Connections accepted on the WebSocket port.
    pub ws_accepted: AtomicU64,
    /// Of those, upgraded to a WebSocket.
    pub ws_upgraded: AtomicU64,
    /// Requests refused and WebSockets closed for a broken rule.
    pub ws_refused: AtomicU64,
    /// Attached connections found not to acknowledge (PROTOCOL.md §7.16).
    pub unacked_connections: AtomicU64,
    /// Frames dropped from replay rings unacknowledged, while attached / while suspended.
    pub dropped_attached: AtomicU64,
    pub dropped_suspended: AtomicU64,
    /// Times a pod PAUSEd a session's input (POD-LINK.md §4).
    pub input_pauses: AtomicU64,
    /// State journal writes that failed (the shard stops journaling) and unreadable restored
    /// records.
    pub state_errors: AtomicU64,
    /// State journal rewrites.
    pub state_compactions: AtomicU64,
    pub handshake: Histogram,
    pub resume: Histogram,
    /// ClawRoam moves started here, completed (the target holds the session), called off.
    pub roams_started: AtomicU64,
    pub roams_completed: AtomicU64,
    pub roams_called_off: AtomicU64,
    /// Sessions that roamed in and serve here.
    pub roams_in: AtomicU64,
    /// RESUMEs for sessions held elsewhere answered with ROAM.
    pub roam_redirects: AtomicU64,
    /// Freeze to release of the moves that completed.
    pub roam: Histogram,
    /// Clients this shard started relaying to the node that holds their session.
    pub relays_opened: AtomicU64,
    /// Relayed clients this shard anchors (gauge).
    pub relays_anchored: AtomicU64,
}

impl ShardMetrics {
    pub fn inc(c: &AtomicU64, by: u64) {
        c.fetch_add(by, Relaxed);
    }
    pub fn set(c: &AtomicU64, v: u64) {
        c.store(v, Relaxed);
    }
    pub fn error(&self, code: u16) {
        if let Some(c) = self.errors.get(code as usize) {
            c.fetch_add(1, Relaxed);
        }
    }
}

/// Every shard's metrics plus node-wide state.
pub struct Metrics {
    pub shards: Vec<ShardMetrics>,
    /// Shards that have started serving.
    pub ready_shards: AtomicUsize,
    pub backend: std::sync::OnceLock<String>,
    /// Shard threads that have ended, however they ended (see [`Metrics::watch_shard_thread`]).
    pub shards_ended: AtomicUsize,
    /// Set when a stop was requested (SIGTERM): shards ending then is expected.
    pub stopping: AtomicBool,
    /// Live upgrades this process handed itself over in (completed), refused before anything
    /// moved (another hand-off format or shard count), or that failed part way.
    pub upgrades_completed: AtomicU64,
    pub upgrades_refused: AtomicU64,
    pub upgrades_failed: AtomicU64,
    /// The last hand-off, given or taken: sessions, connections and pod links moved, bytes
    /// sent over the upgrade socket, and how long it took (µs).
    pub upgrade_last: [AtomicU64; 5],
}

/// Counts its shard thread in [`Metrics::shards_ended`] when the thread's locals are destroyed,
/// which happens when the thread ends: after a normal return, an error, or a panic's unwinding.
struct ShardThreadGuard(Arc<Metrics>);

impl Drop for ShardThreadGuard {
    fn drop(&mut self) {
        self.0.shards_ended.fetch_add(1, Relaxed);
    }
}

thread_local! {
    static SHARD_THREAD: RefCell<Option<ShardThreadGuard>> = const { RefCell::new(None) };
}

impl Metrics {
    pub fn new(shards: usize) -> Metrics {
        Metrics {
            shards: (0..shards).map(|_| ShardMetrics::default()).collect(),
            ready_shards: AtomicUsize::new(0),
            backend: std::sync::OnceLock::new(),
            shards_ended: AtomicUsize::new(0),
            stopping: AtomicBool::new(false),
            upgrades_completed: AtomicU64::new(0),
            upgrades_refused: AtomicU64::new(0),
            upgrades_failed: AtomicU64::new(0),
            upgrade_last: Default::default(),
        }
    }

    /// Records a hand-off's figures (see [`Metrics::upgrade_last`]).
    pub fn note_upgrade(
        &self,
        sessions: u64,
        conns: u64,
        links: u64,
        bytes: u64,
        took: std::time::Duration,
    ) {
        for (a, v) in
            self.upgrade_last
                .iter()
                .zip([sessions, conns, links, bytes, took.as_micros() as u64])
        {
            a.store(v, Relaxed);
        }
    }

    /// Called on a shard's own thread when it starts: the thread is counted in
    /// `shards_ended` when it ends, however it ends (return, error or panic).
    pub fn watch_shard_thread(self: &Arc<Self>) {
        let guard = ShardThreadGuard(self.clone());
        SHARD_THREAD.with(|g| *g.borrow_mut() = Some(guard));
    }

    /// Liveness: `Err(why)` once a shard thread has ended while no stop was requested (the
    /// node can no longer serve that shard's sessions; the process should be restarted).
    pub fn health(&self) -> Result<(), String> {
        let ended = self.shards_ended.load(Relaxed);
        if ended == 0 || self.stopping.load(Relaxed) {
            return Ok(());
        }
        Err(format!(
            "{ended} of {} shards stopped unexpectedly",
            self.shards.len()
        ))
    }

    /// Ready once every shard is serving.
    pub fn ready(&self) -> bool {
        self.ready_shards.load(Relaxed) >= self.shards.len()
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self, pod_sockets: usize) -> String {
        let mut o = String::with_capacity(8192);
        let per_shard = |o: &mut String,
                         name: &str,
                         help: &str,
                         kind: &str,
                         f: &dyn Fn(&ShardMetrics) -> u64| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (i, s) in self.shards.iter().enumerate() {
                let _ = writeln!(o, "{name}{{shard=\"{i}\"}} {}", f(s));
            }
        };
        let _ = writeln!(
            o,
            "# HELP clawterm_sessions Sessions by state and shard (refreshed every second).\n# TYPE clawterm_sessions gauge"
        );
        for (i, s) in self.shards.iter().enumerate() {
            let _ = writeln!(
                o,
                "clawterm_sessions{{state=\"attached\",shard=\"{i}\"}} {}",
                s.sessions_attached.load(Relaxed)
            );
            let _ = writeln!(
                o,
                "clawterm_sessions{{state=\"suspended\",shard=\"{i}\"}} {}",
                s.sessions_suspended.load(Relaxed)
            );
        }
        per_shard(
            &mut o,
            "clawterm_connections",
            "Open client connections, handshaking or bound (refreshed every second).",
            "gauge",
            &|s| s.connections.load(Relaxed),
        );
        let sum = |f: &dyn Fn(&ShardMetrics) -> u64| self.shards.iter().map(f).sum::<u64>();
        let _ = writeln!(o, "# HELP clawterm_frames_total ClawTerm frames by direction.\n# TYPE clawterm_frames_total counter");
        let _ = writeln!(
            o,
            "clawterm_frames_total{{dir=\"in\"}} {}",
            sum(&|s| s.frames_in.load(Relaxed))
        );
        let _ = writeln!(
            o,
            "clawterm_frames_total{{dir=\"out\"}} {}",
            sum(&|s| s.frames_out.load(Relaxed))
        );
        let _ = writeln!(o, "# HELP clawterm_bytes_total Client bytes on the wire by direction.\n# TYPE clawterm_bytes_total counter");
        let _ = writeln!(
            o,
            "clawterm_bytes_total{{dir=\"in\"}} {}",
            sum(&|s| s.bytes_in.load(Relaxed))
        );
        let _ = writeln!(
            o,
            "clawterm_bytes_total{{dir=\"out\"}} {}",
            sum(&|s| s.bytes_out.load(Relaxed))
        );
        let _ = writeln!(o, "# HELP clawterm_errors_total ERROR frames sent, by code.\n# TYPE clawterm_errors_total counter");
        for code in ErrorCode::ALL {
            let n = sum(&|s| s.errors[code as usize].load(Relaxed));
            let _ = writeln!(o, "clawterm_errors_total{{code=\"{}\"}} {n}", code.name());
        }
        let _ = writeln!(o, "# HELP clawterm_unknown_frames_total Frames of unknown type received and ignored.\n# TYPE clawterm_unknown_frames_total counter");
        let _ = writeln!(
            o,
            "clawterm_unknown_frames_total {}",
            sum(&|s| s.unknown_frames.load(Relaxed))
        );
        let _ = writeln!(o, "# HELP clawterm_resumes_total Successful resumes by where the RESUME landed.\n# TYPE clawterm_resumes_total counter");
        let _ = writeln!(
            o,
            "clawterm_resumes_total{{kind=\"same_shard\"}} {}",
            sum(&|s| s.resumes_same_shard.load(Relaxed))
        );
        let _ = writeln!(
            o,
            "clawterm_resumes_total{{kind=\"cross_shard\"}} {}",
            sum(&|s| s.resumes_cross_shard.load(Relaxed))
        );
        let _ = writeln!(o, "# HELP clawterm_unacked_connections_total Attached connections that received everything sent but did not acknowledge it while their agent waited (PROTOCOL.md 7.16): paced by their send backlog from then on.\n# TYPE clawterm_unacked_connections_total counter");
        let _ = writeln!(
            o,
            "clawterm_unacked_connections_total {}",
            sum(&|s| s.unacked_connections.load(Relaxed))
        );
        let _ = writeln!(o, "# HELP clawterm_ring_dropped_frames_total Frames dropped from replay rings before the client acknowledged them, by session state (the next RESUME asking for them gets GAP).\n# TYPE clawterm_ring_dropped_frames_total counter");
        let _ = writeln!(
            o,
            "clawterm_ring_dropped_frames_total{{state=\"attached\"}} {}",
            sum(&|s| s.dropped_attached.load(Relaxed))
        );
        let _ = writeln!(
            o,
            "clawterm_ring_dropped_frames_total{{state=\"suspended\"}} {}",
            sum(&|s| s.dropped_suspended.load(Relaxed))
        );
        let _ = writeln!(o, "# HELP clawterm_input_pauses_total Times an agent pod PAUSEd a session's input (its client is not read until the pod's CONTINUE).\n# TYPE clawterm_input_pauses_total counter");
        let _ = writeln!(
            o,
            "clawterm_input_pauses_total {}",
            sum(&|s| s.input_pauses.load(Relaxed))
        );
        let _ = writeln!(o, "# HELP clawterm_upgrades_total Live upgrades this process handed itself over in, by result (refused: nothing moved and it served on).\n# TYPE clawterm_upgrades_total counter");
        for (result, v) in [
            ("completed", &self.upgrades_completed),
            ("refused", &self.upgrades_refused),
            ("failed", &self.upgrades_failed),
        ] {
            let _ = writeln!(
                o,
                "clawterm_upgrades_total{{result=\"{result}\"}} {}",
                v.load(Relaxed)
            );
        }
        let _ = writeln!(o, "# HELP clawterm_upgrade_last_moved The last live upgrade this process gave or took: what moved.\n# TYPE clawterm_upgrade_last_moved gauge");
        for (what, i) in [
            ("sessions", 0),
            ("connections", 1),
            ("links", 2),
            ("bytes", 3),
        ] {
            let _ = writeln!(
                o,
                "clawterm_upgrade_last_moved{{what=\"{what}\"}} {}",
                self.upgrade_last[i].load(Relaxed)
            );
        }
        let _ = writeln!(o, "# HELP clawterm_upgrade_last_seconds How long the last live upgrade this process gave or took lasted.\n# TYPE clawterm_upgrade_last_seconds gauge");
        let _ = writeln!(
            o,
            "clawterm_upgrade_last_seconds {}",
            self.upgrade_last[4].load(Relaxed) as f64 / 1e6
        );
        let _ = writeln!(o, "# HELP clawterm_state_errors_total State journal failures (a shard whose journal write failed stops journaling: its sessions no longer survive a restart).\n# TYPE clawterm_state_errors_total counter");
        let _ = writeln!(
            o,
            "clawterm_state_errors_total {}",
            sum(&|s| s.state_errors.load(Relaxed))
        );
        let _ = writeln!(o, "# HELP clawterm_state_compactions_total State journal rewrites.\n# TYPE clawterm_state_compactions_total counter");
        let _ = writeln!(
            o,
            "clawterm_state_compactions_total {}",
            sum(&|s| s.state_compactions.load(Relaxed))
        );
        let _ = writeln!(o, "# HELP clawterm_replay_bytes_total Payload bytes replayed on resume.\n# TYPE clawterm_replay_bytes_total counter");
        let _ = writeln!(
            o,
            "clawterm_replay_bytes_total {}",
            sum(&|s| s.replay_bytes.load(Relaxed))
        );
        per_shard(
            &mut o,
            "clawterm_ring_bytes",
            "Unacknowledged payload bytes held in replay rings (refreshed every second).",
            "gauge",
            &|s| s.ring_bytes.load(Relaxed),
        );
        per_shard(
            &mut o,
            "clawterm_pod_links",
            "Open links to agent pods (refreshed every second).",
            "gauge",
            &|s| s.pod_links.load(Relaxed),
        );
        per_shard(
            &mut o,
            "clawterm_quic_connections",
            "QUIC connections (refreshed every second); each carries one stream per session.",
            "gauge",
            &|s| s.quic_connections.load(Relaxed),
        );
        let _ = writeln!(o, "# HELP clawterm_quic_forwarded_total QUIC datagrams the kernel delivered to the wrong shard, forwarded to their connection's shard (0 while the steering program is attached).\n# TYPE clawterm_quic_forwarded_total counter");
        let _ = writeln!(
            o,
            "clawterm_quic_forwarded_total {}",
            sum(&|s| s.quic_forwarded.load(Relaxed))
        );
        for (name, help, pick) in [
            (
                "clawterm_ws_connections_total",
                "Connections accepted on the WebSocket port (pages and WebSockets).",
                0u8,
            ),
            (
                "clawterm_ws_upgrades_total",
                "Connections of the WebSocket port upgraded to a WebSocket.",
                1,
            ),
            (
                "clawterm_ws_refused_total",
                "WebSocket-port requests refused (HTTP 4xx) and WebSockets closed because the client broke a rule.",
                2,
            ),
        ] {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} counter");
            let v = sum(&|s| match pick {
                0 => s.ws_accepted.load(Relaxed),
                1 => s.ws_upgraded.load(Relaxed),
                _ => s.ws_refused.load(Relaxed),
            });
            let _ = writeln!(o, "{name} {v}");
        }
        let _ = writeln!(o, "# HELP clawterm_roams_total ClawRoam moves of sessions away from this node, by result (called_off: the session went on here).\n# TYPE clawterm_roams_total counter");
        for (result, pick) in [("started", 0u8), ("completed", 1), ("called_off", 2)] {
            let n = sum(&|s| {
                match pick {
                    0 => &s.roams_started,
                    1 => &s.roams_completed,
                    _ => &s.roams_called_off,
                }
                .load(Relaxed)
            });
            let _ = writeln!(o, "clawterm_roams_total{{result=\"{result}\"}} {n}");
        }
        let _ = writeln!(o, "# HELP clawterm_roams_in_total Sessions that moved to this node from another and serve here.\n# TYPE clawterm_roams_in_total counter\nclawterm_roams_in_total {}", sum(&|s| s.roams_in.load(Relaxed)));
        let _ = writeln!(o, "# HELP clawterm_relays_total Clients that cannot follow ROAM, relayed from this node to the node that holds their session.\n# TYPE clawterm_relays_total counter\nclawterm_relays_total {}", sum(&|s| s.relays_opened.load(Relaxed)));
        let _ = writeln!(o, "# HELP clawterm_relayed_sessions Relayed clients this node anchors now (refreshed every second).\n# TYPE clawterm_relayed_sessions gauge\nclawterm_relayed_sessions {}", sum(&|s| s.relays_anchored.load(Relaxed)));
        let _ = writeln!(o, "# HELP clawterm_roam_redirects_total RESUMEs for sessions held by another node answered with ROAM.\n# TYPE clawterm_roam_redirects_total counter\nclawterm_roam_redirects_total {}", sum(&|s| s.roam_redirects.load(Relaxed)));
        let _ = writeln!(o, "# HELP clawterm_pods Agent pod sockets registered on the node.\n# TYPE clawterm_pods gauge\nclawterm_pods {pod_sockets}");
        for (name, help, pick) in [
            (
                "clawterm_handshake_seconds",
                "Accept to ACCEPT sent, for new sessions.",
                0,
            ),
            (
                "clawterm_resume_seconds",
                "Accept to RESUMED sent, for resumed sessions.",
                1,
            ),
            (
                "clawterm_roam_seconds",
                "ClawRoam moves that completed: freeze to release at the source.",
                2,
            ),
        ] {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} histogram");
            fn pick_h(s: &ShardMetrics, pick: u8) -> &Histogram {
                match pick {
                    0 => &s.handshake,
                    1 => &s.resume,
                    _ => &s.roam,
                }
            }
            let mut cum = 0u64;
            for (i, b) in BUCKETS.iter().enumerate() {
                cum += sum(&|s| pick_h(s, pick).counts[i].load(Relaxed));
                let _ = writeln!(o, "{name}_bucket{{le=\"{b}\"}} {cum}");
            }
            cum += sum(&|s| pick_h(s, pick).counts[BUCKETS.len()].load(Relaxed));
            let _ = writeln!(o, "{name}_bucket{{le=\"+Inf\"}} {cum}");
            let _ = writeln!(
                o,
                "{name}_sum {}",
                sum(&|s| pick_h(s, pick).sum_us.load(Relaxed)) as f64 / 1e6
            );
            let _ = writeln!(o, "{name}_count {cum}");
        }
        let backend = self.backend.get().map(String::as_str).unwrap_or("starting");
        let _ = writeln!(o, "# HELP clawterm_io_backend The I/O backend in use.\n# TYPE clawterm_io_backend gauge\nclawterm_io_backend{{backend=\"{backend}\"}} 1");
        let _ = writeln!(o, "# HELP clawterm_shards_ready Shards serving.\n# TYPE clawterm_shards_ready gauge\nclawterm_shards_ready {}", self.ready_shards.load(Relaxed));
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_fails_when_a_shard_thread_ends_however_it_ends() {
        let m = Arc::new(Metrics::new(3));
        assert_eq!(m.health(), Ok(()));
        let m2 = m.clone();
        let panicked = std::thread::spawn(move || {
            m2.watch_shard_thread();
            panic!("shard bug");
        })
        .join();
        assert!(panicked.is_err());
        assert_eq!(m.health(), Err("1 of 3 shards stopped unexpectedly".into()));
        let m3 = m.clone();
        std::thread::spawn(move || m3.watch_shard_thread())
            .join()
            .unwrap();
        assert_eq!(m.health(), Err("2 of 3 shards stopped unexpectedly".into()));
        // Shards ending after a requested stop are expected.
        m.stopping.store(true, Relaxed);
        assert_eq!(m.health(), Ok(()));
    }

    #[test]
    fn histogram_and_render() {
        let m = Metrics::new(2);
        m.shards[0].handshake.observe_us(70);
        m.shards[1].handshake.observe_us(2_000_000);
        m.shards[1].error(4);
        let t = m.render(3);
        assert!(t.contains("clawterm_handshake_seconds_bucket{le=\"0.0001\"} 1"));
        assert!(t.contains("clawterm_handshake_seconds_bucket{le=\"+Inf\"} 2"));
        assert!(t.contains("clawterm_errors_total{code=\"NO_SUCH_SESSION\"} 1"));
        assert!(t.contains("clawterm_pods 3"));
    }
}
