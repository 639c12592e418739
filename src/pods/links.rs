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
    /// The current connection (or connect attempt).
    conn: ConnId,
    /// The connect completed: bytes can be sent.
    connected: bool,
    /// The pod's HELLO arrived.
    hello_seen: bool,
    /// The pod's HELLO version on the current connection (0: none yet); 2 = it can export
    /// sessions (POD-LINK.md §7).
    pod_version: u8,
    /// Messages queued before the connect completed.
    pending: Vec<u8>,
    /// A partial message from the pod.
    inbuf: Vec<u8>,
    /// Sessions of this shard on this link.
    sessions: IdSet<u32>,
    /// Client connections whose reading is paused until this link's output queue drains.
    paused_readers: Vec<C>,
    /// Since when the pod is lost (link EOF or socket gone): sessions wait for it, their
    /// input held in `pending`, until `--agent-grace` runs out.
    lost_since: Option<u64>,
    /// Next delay before retrying a refused reconnect while the pod's socket is registered.
    retry_ms: u64,
    /// CONNECTs (connection, client caps) waiting for the link's first connect to complete.
    waiting: Vec<(C, u8)>,
    /// Bytes at the head of `pending` that belong to the current connect attempt (HELLO and
    /// REOPENs): dropped if that attempt fails, so the next one does not repeat them.
    prefix_len: usize,
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

    /// The link's connection (or its connect in flight).
    pub fn conn(&self) -> ConnId {
        self.conn
    }

    /// Whether the connect completed and bytes go straight out.
    pub fn is_up(&self) -> bool {
        self.connected
    }

    /// Whether the pod is lost (sessions wait for it).
    pub fn is_lost(&self) -> bool {
        self.lost_since.is_some()
    }

    /// Where pod-link bytes go: the connection when the link is up (`Some`), otherwise they are
    /// held (in order, after the HELLO and REOPENs of the next attempt) and `None` is returned.
    pub fn route(&mut self, bytes: &[u8]) -> Option<ConnId> {
        if self.connected {
            Some(self.conn)
        } else {
            self.pending.extend_from_slice(bytes);
            None
        }
    }

    /// The sessions of this shard on this link.
    pub fn sessions(&self) -> &IdSet<u32> {
        &self.sessions
    }

    /// A session of this shard now uses this link.
    pub fn add_session(&mut self, sid: u32) {
        self.sessions.insert(sid);
    }

    /// A session of this shard ended.
    pub fn remove_session(&mut self, sid: u32) {
        self.sessions.remove(&sid);
    }

    /// A CONNECT (connection, client caps) waits for the link's connect to complete.
    pub fn wait_for_connect(&mut self, conn: C, caps: u8) {
        self.waiting.push((conn, caps));
    }

    /// Stops reading `conn` until the link's queue drains.
    pub fn pause_reader(&mut self, conn: C) {
        self.paused_readers.push(conn);
    }

    /// The clients whose reading waits for the link to drain (all of them, taken).
    pub fn take_paused_readers(&mut self) -> Vec<C> {
        std::mem::take(&mut self.paused_readers)
    }

    /// Whether the pod's HELLO arrived on the current connection.
    pub fn hello_seen(&self) -> bool {
        self.hello_seen
    }

    /// The pod's HELLO arrived.
    pub fn saw_hello(&mut self) {
        self.hello_seen = true;
    }

    /// The pod's HELLO version (0 before its HELLO).
    pub fn pod_version(&self) -> u8 {
        self.pod_version
    }

    /// Notes the pod's HELLO version.
    pub fn set_pod_version(&mut self, v: u8) {
        self.pod_version = v;
    }

    /// Takes the partial message the pod left (decode the new bytes after it).
    pub fn take_input(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.inbuf)
    }

    /// Keeps a partial message from the pod for the next read (the buffer is reused).
    pub fn keep_input(&mut self, rest: Vec<u8>) {
        self.inbuf = rest;
    }
}

impl<C: PartialEq> Link<C> {
    /// What a link leaving the process (a live upgrade) takes with it: whether the pod's
    /// HELLO was seen, the partial message received, and what is held for the pod.
    pub fn take_for_export(&mut self) -> (bool, Vec<u8>, Vec<u8>) {
        (
            self.hello_seen,
            std::mem::take(&mut self.inbuf),
            std::mem::take(&mut self.pending),
        )
    }

    /// Client input held for a pod that is away (or not connected yet): whole pod-link
    /// messages, oldest first, without this connect attempt's HELLO and REOPENs.
    pub fn held(&self) -> &[u8] {
        if self.connected {
            &[]
        } else {
            &self.pending[self.prefix_len.min(self.pending.len())..]
        }
    }

    /// Whether `conn` waits for this link to drain.
    pub fn holds_reader(&self, conn: &C) -> bool {
        self.paused_readers.contains(conn)
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
                version: podlink::codec::VERSION_MIGRATE,
                name,
            },
        );
        let prefix_len = pending.len();
        self.by_conn.insert(conn, key);
        self.by_key.entry(key).or_insert(Link {
            conn,
            connected: false,
            hello_seen: false,
            pod_version: 0,
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

    /// Sessions restored from a state dir (the daemon restarted): their pod's link is lost
    /// since `now` — as if it had broken at the restart — so they wait for the pod within the
    /// grace period, like any session whose pod went away, with no connection yet (the pod's
    /// socket appearing, or a retry, reconnects it and REOPENs them). Returns the grace timer.
    pub fn restore(
        &mut self,
        key: (u32, u32),
        sids: impl IntoIterator<Item = u32>,
        now: u64,
        grace_ms: u64,
    ) -> LinkAction {
        let l = self.by_key.entry(key).or_insert(Link {
            conn: ConnId::NONE,
            connected: false,
            hello_seen: false,
            pod_version: 0,
            pending: Vec::new(),
            inbuf: Vec::new(),
            sessions: IdSet::default(),
            paused_readers: Vec::new(),
            lost_since: Some(now),
            retry_ms: Link::<C>::FIRST_RETRY_MS,
            waiting: Vec::new(),
            prefix_len: 0,
        });
        l.sessions.extend(sids);
        LinkAction::Arm(now + grace_ms, LinkTimer::Grace)
    }

    /// Input held for a restored link's pod before the restart (sent after the REOPENs).
    pub fn restore_held(&mut self, key: (u32, u32), held: &[u8]) {
        if let Some(l) = self.by_key.get_mut(&key) {
            l.pending.extend_from_slice(held);
        }
    }

    /// A connected link another process handed over (a live upgrade): up, HELLO exchanged as
    /// it was, carrying `sids`.
    pub fn adopt(
        &mut self,
        key: (u32, u32),
        conn: ConnId,
        hello_seen: bool,
        sids: impl IntoIterator<Item = u32>,
    ) {
        self.by_conn.insert(conn, key);
        let l = self.by_key.entry(key).or_insert(Link {
            conn,
            connected: true,
            hello_seen,
            // Not carried by a live upgrade's hand-off: taken as the base version until the
            // link reconnects (sessions on it move only with --force meanwhile).
            pod_version: u8::from(hello_seen),
            pending: Vec::new(),
            inbuf: Vec::new(),
            sessions: IdSet::default(),
            paused_readers: Vec::new(),
            lost_since: None,
            retry_ms: Link::<C>::FIRST_RETRY_MS,
            waiting: Vec::new(),
            prefix_len: 0,
        });
        l.sessions.extend(sids);
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
        l.pod_version = 0;
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

    /// The link's connection broke (EOF, error, broken framing, a failed connect) or its socket
    /// disappeared. Decides what follows (POD-LINK.md §5): a link already waiting for its pod
    /// keeps waiting within the same grace period (another retry); a link with no sessions, or
    /// no grace period, is gone for good; otherwise its sessions wait `grace_ms` for the pod,
    /// with their input held, the pod's PAUSEs released (they went with it) and, while the
    /// socket is still registered, reconnects tried with backoff.
    pub fn lost(
        &mut self,
        key: (u32, u32),
        now: u64,
        grace_ms: u64,
        socket_present: bool,
    ) -> Vec<LinkAction> {
        let Some(l) = self.by_key.get(&key) else {
            return Vec::new();
        };
        let mut actions = Vec::new();
        if l.lost_since.is_some() {
            self.mark_lost(key, now);
            actions.extend(self.retry(key, now, socket_present));
            return actions;
        }
        if grace_ms == 0 || l.sessions.is_empty() {
            return self.gone(key);
        }
        self.mark_lost(key, now);
        actions.push(LinkAction::Arm(now + grace_ms, LinkTimer::Grace));
        actions.extend(self.retry(key, now, socket_present));
        if let Some(l) = self.by_key.get(&key) {
            actions.push(LinkAction::ReleaseInput(
                l.sessions.iter().copied().collect(),
            ));
        }
        actions
    }

    /// The next reconnect attempt while the pod's socket is registered (a pod restarting in
    /// place, or one whose socket exists but refused us), with doubling backoff; none when the
    /// socket is gone (the registry reports its return).
    fn retry(&mut self, key: (u32, u32), now: u64, socket_present: bool) -> Option<LinkAction> {
        if !socket_present {
            return None;
        }
        let l = self.by_key.get_mut(&key)?;
        let at = now + l.retry_ms;
        l.retry_ms = (l.retry_ms * 2).min(Link::<C>::MAX_RETRY_MS);
        Some(LinkAction::Arm(at, LinkTimer::Retry))
    }

    /// A reconnect attempt could not even start (the socket refused at once).
    pub fn reconnect_failed(
        &mut self,
        key: (u32, u32),
        now: u64,
        socket_present: bool,
    ) -> Option<LinkAction> {
        self.retry(key, now, socket_present)
    }

    /// Whether the link waits for its pod with no reconnect in flight: the pod's socket
    /// appearing, or a retry timer, should reconnect it.
    pub fn wants_reconnect(&self, key: (u32, u32)) -> bool {
        self.by_key
            .get(&key)
            .is_some_and(|l| l.lost_since.is_some() && !self.by_conn.contains_key(&l.conn))
    }

    /// The grace timer of a lost link fired: if the pod has not come back within `grace_ms`,
    /// a reconnect in flight is aborted and the pod is gone for good.
    pub fn grace_due(&mut self, key: (u32, u32), now: u64, grace_ms: u64) -> Vec<LinkAction> {
        let Some(l) = self.by_key.get(&key) else {
            return Vec::new();
        };
        if l.lost_since.is_none_or(|t| t + grace_ms > now) {
            return Vec::new();
        }
        let mut actions = Vec::new();
        if !l.connected && self.by_conn.contains_key(&l.conn) {
            actions.push(LinkAction::Abort(l.conn));
        }
        actions.extend(self.gone(key));
        actions
    }

    /// The pod is gone for good: the link is forgotten and its sessions end.
    fn gone(&mut self, key: (u32, u32)) -> Vec<LinkAction> {
        match self.remove(key) {
            Some(l) => vec![LinkAction::AgentGone(l.sessions.iter().copied().collect())],
            None => Vec::new(),
        }
    }

    /// The link's connect completed: it is up, what was held goes out (HELLO and REOPENs
    /// first), clients it paused may read again unless its queue is already over the
    /// watermark (`backpressured` after the send), and the CONNECTs that waited for it open
    /// their sessions. Returns what to send and what follows.
    pub fn link_up(&mut self, key: (u32, u32)) -> Connected<C> {
        let Some(l) = self.by_key.get_mut(&key) else {
            return Connected::default();
        };
        l.connected = true;
        l.lost_since = None;
        l.retry_ms = Link::<C>::FIRST_RETRY_MS;
        Connected {
            send: std::mem::take(&mut l.pending),
            waiting: std::mem::take(&mut l.waiting),
        }
    }

    /// After [`Links::link_up`]'s bytes were sent: the clients to read again when the link's
    /// queue is not over its watermark.
    pub fn drained(&mut self, key: (u32, u32), backpressured: bool) -> Vec<C> {
        match self.by_key.get_mut(&key) {
            Some(l) if !backpressured => std::mem::take(&mut l.paused_readers),
            _ => Vec::new(),
        }
    }

    /// The link's connect failed: the CONNECTs that waited for it (to be refused with
    /// NO_AGENT). What follows for the link is [`Links::lost`]'s.
    pub fn connect_failed(&mut self, key: (u32, u32)) -> Vec<(C, u8)> {
        self.by_key
            .get_mut(&key)
            .map(|l| std::mem::take(&mut l.waiting))
            .unwrap_or_default()
    }
}

/// What a shard does next for one of its pod links, as [`Links`] decides it.
#[derive(Debug, PartialEq, Eq)]
pub enum LinkAction {
    /// File a timer at this time (ms on the shard's clock).
    Arm(u64, LinkTimer),
    /// The pod is gone for good: these sessions end with AGENT_GONE, after the output the pod
    /// already produced.
    AgentGone(Vec<u32>),
    /// The pod that PAUSEd these sessions' input is gone; its PAUSEs went with it.
    ReleaseInput(Vec<u32>),
    /// Abort this connection (a reconnect in flight).
    Abort(ConnId),
}

/// A link's timers.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum LinkTimer {
    /// The grace period of a lost pod ends.
    Grace,
    /// Try reconnecting to a lost pod whose socket is still registered.
    Retry,
}

/// What a completed connect sends and unblocks ([`Links::link_up`]).
pub struct Connected<C> {
    /// The bytes held for the link (HELLO, REOPENs, then held input).
    pub send: Vec<u8>,
    /// CONNECTs (connection, client caps) that waited for the link.
    pub waiting: Vec<(C, u8)>,
}

impl<C> Default for Connected<C> {
    fn default() -> Self {
        Connected {
            send: Vec::new(),
            waiting: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(i: u32) -> ConnId {
        // Connection ids come from the runtime; a simulated context makes them.
        let mut ctx: shards::sim::SimCtx<()> =
            shards::sim::SimCtx::new(0, 1, std::time::Instant::now());
        let mut last = None;
        for _ in 0..i {
            last = Some(ctx.accept("127.0.0.1:1".parse().unwrap()));
        }
        last.unwrap()
    }

    const K: (u32, u32) = (7, 42);

    /// A link with sessions waits for its pod: grace timer, retries with doubling backoff while
    /// the socket is there, the pod's PAUSEs released; within the grace period a failed
    /// attempt only retries; once the grace period is over the pod is gone for good.
    #[test]
    fn lost_link_waits_then_gives_up() {
        let mut links: Links<u8> = Links::default();
        links.insert(K, conn(1), "t");
        links.get_mut(K).unwrap().add_session(5);
        let up = links.link_up(K);
        assert!(!up.send.is_empty(), "HELLO goes first");
        let a = links.lost(K, 1000, 60_000, true);
        assert_eq!(
            a,
            vec![
                LinkAction::Arm(61_000, LinkTimer::Grace),
                LinkAction::Arm(1050, LinkTimer::Retry),
                LinkAction::ReleaseInput(vec![5]),
            ]
        );
        assert!(links.wants_reconnect(K));
        links.reconnect(K, conn(2), vec![1, 2, 3]);
        assert!(!links.wants_reconnect(K), "an attempt is in flight");
        // The attempt fails: only another retry, later.
        assert_eq!(
            links.lost(K, 1100, 60_000, true),
            vec![LinkAction::Arm(1200, LinkTimer::Retry)]
        );
        assert_eq!(links.grace_due(K, 60_999, 60_000), vec![]);
        links.reconnect(K, conn(3), vec![]);
        assert_eq!(
            links.grace_due(K, 61_000, 60_000),
            vec![LinkAction::Abort(conn(3)), LinkAction::AgentGone(vec![5])]
        );
        assert!(links.get(K).is_none());
    }

    /// Without sessions or without a grace period, a lost link is gone at once; without the
    /// socket, nothing is retried (the registry reports its return).
    #[test]
    fn lost_link_without_sessions_or_socket() {
        let mut links: Links<u8> = Links::default();
        links.insert(K, conn(1), "t");
        assert_eq!(
            links.lost(K, 0, 60_000, true),
            vec![LinkAction::AgentGone(vec![])]
        );
        links.insert(K, conn(2), "t");
        links.get_mut(K).unwrap().add_session(9);
        assert_eq!(
            links.lost(K, 0, 0, true),
            vec![LinkAction::AgentGone(vec![9])]
        );
        links.insert(K, conn(3), "t");
        links.get_mut(K).unwrap().add_session(9);
        assert_eq!(
            links.lost(K, 0, 500, false),
            vec![
                LinkAction::Arm(500, LinkTimer::Grace),
                LinkAction::ReleaseInput(vec![9])
            ]
        );
    }
}
