//! Agent pods: where their sockets are, and each shard's links to them.
//!
//! A pod serving tenant T, agent A listens at `{socket_dir}/{T}_{A}`. Each shard opens one link
//! per pod the first time one of its sessions needs it and multiplexes all its sessions for
//! that pod over it (POD-LINK.md §2).

use crate::podlink::{self, Msg};
use crate::session::table::{IdMap, IdSet};
use shards::ConnId;
use std::path::{Path, PathBuf};

/// The socket path of (tenant, agent).
pub fn socket_path(dir: &Path, tenant: u32, agent: u32) -> PathBuf {
    dir.join(format!("{tenant}_{agent}"))
}

/// A shard's link to one pod. `C` identifies the shard's client connections.
pub struct Link<C> {
    pub key: (u32, u32),
    pub conn: ConnId,
    /// The connect completed: bytes can be sent.
    pub connected: bool,
    /// The pod's HELLO arrived.
    pub hello_seen: bool,
    /// Messages queued before the connect completed.
    pub pending: Vec<u8>,
    /// A partial message from the pod.
    pub inbuf: Vec<u8>,
    /// Sessions of this shard on this link.
    pub sessions: IdSet<u32>,
    /// Client connections whose reading is paused until this link's output queue drains.
    pub paused_readers: Vec<C>,
    /// Since when the pod is lost (link EOF or socket gone): sessions wait for it, their
    /// input held in `pending`, until `--agent-grace` runs out.
    pub lost_since: Option<u64>,
    /// Next delay before retrying a refused reconnect while the pod's socket is registered.
    pub retry_ms: u64,
    /// CONNECTs (connection, client caps) waiting for the link's first connect to complete.
    pub waiting: Vec<(C, u8)>,
    /// Bytes at the head of `pending` that belong to the current connect attempt (HELLO and
    /// REOPENs): dropped if that attempt fails, so the next one does not repeat them.
    pub prefix_len: usize,
}

impl<C> Link<C> {
    /// First delay before retrying a refused connect (doubling up to [`Link::MAX_RETRY_MS`]).
    pub const FIRST_RETRY_MS: u64 = 50;
    pub const MAX_RETRY_MS: u64 = 2_000;

    /// Holding more than this for a lost or connecting pod pauses the clients feeding it.
    pub const HELD_LIMIT: usize = 1 << 20;

    /// Whether input for this link should stop being read from clients for now.
    pub fn over_limit(&self, backpressured: bool) -> bool {
        if self.connected {
            backpressured
        } else {
            self.pending.len() > Self::HELD_LIMIT
        }
    }
}

/// A shard's links, by pod and by connection.
pub struct Links<C> {
    by_key: IdMap<(u32, u32), Link<C>>,
    by_conn: IdMap<ConnId, (u32, u32)>,
}

impl<C> Default for Links<C> {
    fn default() -> Self {
        Links {
            by_key: IdMap::default(),
            by_conn: IdMap::default(),
        }
    }
}

impl<C> Links<C> {
    pub fn get(&self, key: (u32, u32)) -> Option<&Link<C>> {
        self.by_key.get(&key)
    }

    pub fn get_mut(&mut self, key: (u32, u32)) -> Option<&mut Link<C>> {
        self.by_key.get_mut(&key)
    }

    pub fn key_of(&self, conn: ConnId) -> Option<(u32, u32)> {
        self.by_conn.get(&conn).copied()
    }

    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }

    /// Links whose connection is up.
    pub fn connected(&self) -> usize {
        self.by_key.values().filter(|l| l.connected).count()
    }

    /// Registers a new link whose connect is in progress; HELLO is queued first.
    pub fn insert(&mut self, key: (u32, u32), conn: ConnId, name: &str) -> &mut Link<C> {
        let mut pending = Vec::new();
        podlink::encode(
            &mut pending,
            0,
            &Msg::Hello {
                version: podlink::codec::VERSION,
                name,
            },
        );
        let prefix_len = pending.len();
        self.by_conn.insert(conn, key);
        self.by_key.entry(key).or_insert(Link {
            key,
            conn,
            connected: false,
            hello_seen: false,
            pending,
            inbuf: Vec::new(),
            sessions: IdSet::default(),
            paused_readers: Vec::new(),
            lost_since: None,
            retry_ms: Link::<C>::FIRST_RETRY_MS,
            waiting: Vec::new(),
            prefix_len,
        })
    }

    /// The link's connection is gone: keep the link (and what is pending) as lost since `now`.
    /// Returns the dead connection.
    pub fn mark_lost(&mut self, key: (u32, u32), now: u64) -> Option<ConnId> {
        let l = self.by_key.get_mut(&key)?;
        self.by_conn.remove(&l.conn);
        if !l.connected {
            // The attempt that failed queued its own HELLO (and REOPENs): drop them; what
            // follows is held input, kept for the next attempt.
            let n = l.prefix_len.min(l.pending.len());
            l.pending.drain(..n);
        }
        l.prefix_len = 0;
        l.connected = false;
        l.hello_seen = false;
        l.inbuf.clear();
        l.lost_since.get_or_insert(now);
        Some(l.conn)
    }

    /// A lost link gets a new connection; `prefix` (HELLO, REOPENs) goes before the held input.
    pub fn reconnect(&mut self, key: (u32, u32), conn: ConnId, mut prefix: Vec<u8>) {
        if let Some(l) = self.by_key.get_mut(&key) {
            self.by_conn.insert(conn, key);
            l.conn = conn;
            l.prefix_len = prefix.len();
            prefix.extend_from_slice(&l.pending);
            l.pending = prefix;
        }
    }

    pub fn remove(&mut self, key: (u32, u32)) -> Option<Link<C>> {
        let link = self.by_key.remove(&key)?;
        self.by_conn.remove(&link.conn);
        Some(link)
    }

    pub fn keys(&self) -> Vec<(u32, u32)> {
        self.by_key.keys().copied().collect()
    }
}
