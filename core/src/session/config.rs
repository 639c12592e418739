//! Limits and timer settings shared by every session of a shard.

/// What happens when a suspended session's ring is full (POD-LINK.md §4).
#[derive(Copy, Clone, Debug, PartialEq, Eq, Default)]
pub enum Overflow {
    /// Drop the oldest frames; the next RESUMED carries GAP.
    #[default]
    Drop,
    /// PAUSE the agent instead, so nothing is lost.
    Pause,
}

impl std::str::FromStr for Overflow {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "drop" => Ok(Overflow::Drop),
            "pause" => Ok(Overflow::Pause),
            o => Err(format!(
                "unknown overflow policy '{o}': use 'drop' or 'pause'"
            )),
        }
    }
}

/// Settings of the session core. Times are milliseconds on the caller's clock.
#[derive(Clone, Debug)]
pub struct SessionConfig {
    /// Replay ring cap, in payload bytes (`--ring-bytes`).
    pub ring_bytes: usize,
    /// Largest frame payload accepted (`--max-payload`); also bounds what is sent.
    pub max_payload: usize,
    /// Largest DATA payload sent (`--max-send-payload`, default 16 KiB): agent output is split
    /// into frames of at most this much (and never more than `max_payload`).
    pub send_payload: usize,
    /// How long an attached client that has received everything may leave it unacknowledged
    /// while its agent is paused before the connection counts as unacknowledged
    /// (`--ack-wait`; PROTOCOL.md §7.16).
    pub ack_wait_ms: u64,
    /// Send a KEEPALIVE after this long without sending anything (`--keepalive`).
    pub keepalive_ms: u64,
    /// Close the connection after this long without receiving anything (`--idle-timeout`).
    pub idle_ms: u64,
    /// Close a session suspended this long (`--suspend-ttl`).
    pub ttl_ms: u64,
    /// Suspended-ring policy (`--overflow`).
    pub overflow: Overflow,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            ring_bytes: 256 * 1024,
            max_payload: 65535,
            send_payload: Self::DEFAULT_SEND_PAYLOAD,
            ack_wait_ms: 200,
            keepalive_ms: 30_000,
            idle_ms: 90_000,
            ttl_ms: 3_600_000,
            overflow: Overflow::Drop,
        }
    }
}

impl SessionConfig {
    /// Default `--max-send-payload`: some v1 clients compute `13 + LEN` in 16 bits and fail
    /// on frames with LEN ≥ 65523, and smaller frames let other sessions' frames interleave on
    /// a shared link (PROTOCOL.md §7.17).
    pub const DEFAULT_SEND_PAYLOAD: usize = 16 * 1024;

    /// The largest DATA payload to send: `send_payload`, at most `max_payload`, at least 1.
    pub fn send_payload(&self) -> usize {
        self.send_payload.min(self.max_payload).max(1)
    }

    /// Bound on ring payload while a client is attached (or with the pause policy): the agent
    /// is asked to PAUSE at `ring_bytes`; output it already had in flight (its write queue and
    /// the socket buffers) is still kept, up to this bound. Only an agent that ignores PAUSE
    /// loses its oldest frames, reported as GAP.
    pub fn hard_ring_bytes(&self) -> usize {
        self.ring_bytes
            .saturating_add(self.ring_bytes.max(Self::PAUSE_SLACK))
    }

    /// In-flight output an agent may still deliver after PAUSE.
    pub const PAUSE_SLACK: usize = 4 << 20;
}
