//! Live upgrade (`clawtermd --upgrade`): a new clawtermd takes a running one's place on the same
//! state dir without ending a session or refusing a connection.
//!
//! 1. The new process finds the state dir locked, connects to `DIR/upgrade.sock` and says
//!    HELLO with its hand-off format version and shard count. Another version (or shard count)
//!    is refused before anything moves: the old process serves on, the new one exits saying why.
//! 2. The old process hands over the state dir's lock and its listening sockets (TCP, and UDP
//!    with QUIC) — the same sockets, so connections the kernel queues meanwhile wait for the
//!    new process rather than being refused. The new process grows its descriptor table for
//!    everything to come, starts its shards (empty, accepting paused) and says START.
//! 3. Every old shard stops accepting and from then on keeps a RESUME for another shard's
//!    session unread on its connection. Then the shards move one at a time: a shard freezes,
//!    writes each session's record, and takes its plaintext client connections and connected
//!    pod links out of its reactor with the bytes received but not yet processed and the
//!    output not yet sent (connections accepted as the listener went over included); its part
//!    goes over the socket (SHARD), descriptors by SCM_RIGHTS.
//! 4. The new process writes that shard's fresh journal and its shard takes the part in and
//!    serves it at once (SHARD_IN: only now does the next old shard freeze); once every shard
//!    has, they accept again and it says READY. The old one then closes what could not move
//!    (TLS and QUIC connections: their clients RESUME at the new process, with exact replay)
//!    and exits.
//!
//! See `docs/STATE.md` for the guarantees and the format ([`wire`]).

pub mod channel;
pub mod old;
pub mod take;
pub mod wire;

use std::os::fd::OwnedFd;

/// A plaintext client connection leaving a shard (or arriving at one).
#[derive(Debug)]
pub struct MovedConn {
    /// The session it is bound to (0: before CONNECT/RESUME).
    pub sid: u32,
    /// The client's address.
    pub peer: String,
    pub fd: OwnedFd,
    /// Bytes received from the client and not yet processed, oldest first.
    pub unread: Vec<u8>,
    /// Bytes for the client not yet sent.
    pub unsent: Vec<u8>,
}

/// A connected pod link leaving a shard (or arriving at one).
#[derive(Debug)]
pub struct MovedLink {
    pub key: (u32, u32),
    /// The pod's HELLO was seen.
    pub hello_seen: bool,
    pub fd: OwnedFd,
    /// Bytes received from the pod and not yet processed, oldest first.
    pub unread: Vec<u8>,
    /// Bytes for the pod not yet sent.
    pub unsent: Vec<u8>,
}

/// Everything one shard hands over.
#[derive(Debug, Default)]
pub struct ShardExport {
    pub shard: usize,
    /// Its sessions' records (ring included).
    pub sessions: Vec<Vec<u8>>,
    pub conns: Vec<MovedConn>,
    pub links: Vec<MovedLink>,
    /// Client input held for pods that are away (their links do not move), by pod.
    pub held: crate::state::Held,
    /// Connections it keeps until the new process serves (TLS, QUIC), then closes.
    pub kept: usize,
}
