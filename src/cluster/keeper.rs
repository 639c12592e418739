//! The Keeper: ClawRoam's session directory on Redis (docs/CLUSTER.md, "The keeper").
//!
//! A directory, not the truth: which node holds a session is decided by the nodes' hand-over;
//! the keeper records it, by compare-and-set on the session's epoch, so RESUMEs at any node find
//! the holder. It runs on a thread of its own, off the per-frame path: callers hand it work on a
//! channel and never wait on Redis (the admin calls excepted). Losing Redis is survivable:
//! writes queue (one per session, the latest wins) and are replayed when it is back, and
//! requests fail fast with [`KeeperError::Unavailable`].
//!
//! Keys (prefix `P`, default `claw`):
//!
//! | key | type | what |
//! |---|---|---|
//! | `P:node:{id}` | hash | `client`, `peer`, `shards`, `sessions`, `ordinal`, `hb` (UNIX ms); expires after 3 heartbeats |
//! | `P:nodes` | set | every node id ever registered |
//! | `P:ordinals` | hash | node id → ordinal (1 ..= 255), allocated once |
//! | `P:ordinal:next` | string | the last ordinal handed out |
//! | `P:s:{sid}` | hash | `node`, `epoch`, `tenant`, `agent`, `caps`, `th` (hex SHA-256 of the resume token, domain separated) |

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tracing::{info, warn};

/// This node, as the keeper publishes it.
#[derive(Clone, Debug)]
pub struct NodeInfo {
    /// The node's id (`--node-id`).
    pub id: String,
    /// HOST:PORT clients reach (ROAM sends them there).
    pub client_addr: String,
    /// HOST:PORT of the peer link.
    pub peer_addr: String,
    /// Shards of the node.
    pub shards: usize,
}

/// How to reach the keeper.
#[derive(Clone, Debug)]
pub struct KeeperConfig {
    /// `redis://HOST:PORT/DB`.
    pub url: String,
    /// This node.
    pub node: NodeInfo,
    /// How often the node record is refreshed; it expires after three.
    pub heartbeat: Duration,
    /// Key prefix (tests use their own).
    pub prefix: String,
    /// The ordinal this node had (from its state dir): lets it start while Redis is away.
    pub cached_ordinal: Option<u8>,
}

/// A session's directory record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The node that holds it.
    pub node: String,
    /// Its fencing epoch (1 where it was made, +1 per move).
    pub epoch: u64,
    pub tenant: u32,
    pub agent: u32,
    /// The capabilities of the CONNECT that made it (ROAM `0x04`: its client follows ROAM;
    /// otherwise RESUMEs elsewhere are relayed).
    pub caps: u8,
    /// [`token_hash`] of its resume token.
    pub token_hash: [u8; 32],
}

/// A node as the keeper knows it.
#[derive(Clone, Debug)]
pub struct NodeView {
    pub id: String,
    pub client_addr: String,
    pub peer_addr: String,
    pub sessions: u64,
    pub shards: usize,
    /// Its record has not expired (a heartbeat within the last three).
    pub alive: bool,
    pub heartbeat_age_ms: u64,
    pub ordinal: u8,
}

/// The answer to a holder flip ([`Keeper::claim`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Claim {
    /// The record named this node at the expected epoch and now names the target.
    Done,
    /// The record holds something else (the compare failed).
    Stale { node: String, epoch: u64 },
    /// There is no record (lost in a Redis fail-over, or never written).
    Missing,
}

/// Why the keeper could not answer.
#[derive(Clone, Debug, thiserror::Error)]
pub enum KeeperError {
    /// Redis is unreachable (or the answer did not come in time): nothing was done.
    #[error("keeper unreachable: {0}")]
    Unavailable(String),
    /// A write was sent but its answer was lost: it may or may not have happened. Ask again
    /// ([`Keeper::lookup`]) before deciding anything.
    #[error("keeper answer lost, the write may have happened: {0}")]
    Ambiguous(String),
    /// The `--keeper` URL is not one Redis accepts.
    #[error("bad keeper URL: {0}")]
    BadUrl(String),
    /// Every ordinal (1 ..= 255) is taken: the cluster has too many node ids.
    #[error("all 255 node ordinals are in use: remove old node ids from the keeper (HDEL <prefix>:ordinals ID)")]
    Ordinals,
    /// Redis answered with an error.
    #[error("keeper: {0}")]
    Redis(String),
}

/// The domain-separated SHA-256 of a resume token: what the directory keeps instead of it.
pub fn token_hash(token: &[u8; 16]) -> [u8; 32] {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(b"clawterm-roam-v1\0");
    ctx.update(token);
    let d = ctx.finish();
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

type Reply<T> = Box<dyn FnOnce(Result<T, KeeperError>) + Send>;

enum Cmd {
    Write(u32, Write),
    Claim {
        sid: u32,
        from: u64,
        to: String,
        epoch: u64,
        deadline: Instant,
        reply: Reply<Claim>,
    },
    Lookup {
        sid: u32,
        deadline: Instant,
        reply: Reply<Option<Entry>>,
    },
    Nodes(Sender<Result<Vec<NodeView>, KeeperError>>),
    Stop(bool),
}

#[derive(Clone, Debug)]
enum Write {
    Created {
        tenant: u32,
        agent: u32,
        caps: u8,
        th: [u8; 32],
    },
    Adopted {
        epoch: u64,
        tenant: u32,
        agent: u32,
        caps: u8,
        th: [u8; 32],
    },
    Ended,
}

struct Inner {
    tx: Sender<Cmd>,
    up: AtomicBool,
    ordinal: u8,
    node: String,
    load: AtomicU64,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// A handle on the keeper thread (cheap to clone).
#[derive(Clone)]
pub struct Keeper(Arc<Inner>);

const ORDINAL_LUA: &str = r#"
local o = redis.call('HGET', KEYS[1], ARGV[1])
if o then return tonumber(o) end
local n = redis.call('INCR', KEYS[2])
if n > 255 then return -1 end
redis.call('HSET', KEYS[1], ARGV[1], n)
return n
"#;

const ENDED_LUA: &str = r#"
if redis.call('HGET', KEYS[1], 'node') == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"#;

/// The flip. ARGV[5] is its deadline (UNIX ms): a flip that reaches Redis later — a request
/// retransmitted after a partition healed, whose sender long gave up waiting — is refused, so
/// it can never land after the target, asking the directory, was told the source kept the
/// session (docs/CLUSTER.md).
const CLAIM_LUA: &str = r#"
local t = redis.call('TIME')
if tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) > tonumber(ARGV[5]) then
  return {'late', '', '0'}
end
local n = redis.call('HGET', KEYS[1], 'node')
if not n then return {'missing', '', '0'} end
local e = redis.call('HGET', KEYS[1], 'epoch')
if n == ARGV[1] and e == ARGV[2] then
  redis.call('HSET', KEYS[1], 'node', ARGV[3], 'epoch', ARGV[4])
  return {'done', ARGV[3], ARGV[4]}
end
return {'stale', n, e}
"#;

/// The target writes the record anew when the directory lost it, or repairs a lost flip:
/// only ever to a newer epoch.
const ADOPT_LUA: &str = r#"
local e = tonumber(redis.call('HGET', KEYS[1], 'epoch') or '0')
if e < tonumber(ARGV[2]) then
  redis.call('HSET', KEYS[1], 'node', ARGV[1], 'epoch', ARGV[2], 'tenant', ARGV[3], 'agent', ARGV[4], 'th', ARGV[5], 'caps', ARGV[6])
  return 1
end
return 0
"#;

/// `url` with its password (if any) replaced by `***`, for logs and error text.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    match rest.split_once('@') {
        Some((auth, host)) => match auth.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
            None => format!("{scheme}://***@{host}"),
        },
        None => url.to_string(),
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn rerr(what: &str, e: redis::RedisError) -> KeeperError {
    if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() || e.is_connection_refusal() {
        KeeperError::Unavailable(format!("{what}: {e}"))
    } else {
        KeeperError::Redis(format!("{what}: {e}"))
    }
}

/// Keys of one keeper (its prefix).
#[derive(Clone)]
struct Keys(String);

impl Keys {
    fn node(&self, id: &str) -> String {
        format!("{}:node:{id}", self.0)
    }
    fn nodes(&self) -> String {
        format!("{}:nodes", self.0)
    }
    fn ordinals(&self) -> String {
        format!("{}:ordinals", self.0)
    }
    fn ordinal_next(&self) -> String {
        format!("{}:ordinal:next", self.0)
    }
    fn session(&self, sid: u32) -> String {
        format!("{}:s:{sid:08x}", self.0)
    }
}

fn connect(client: &redis::Client, timeout: Duration) -> redis::RedisResult<redis::Connection> {
    let c = client.get_connection_with_timeout(timeout)?;
    c.set_read_timeout(Some(Duration::from_secs(1)))?;
    c.set_write_timeout(Some(Duration::from_secs(1)))?;
    Ok(c)
}

fn ordinal(conn: &mut redis::Connection, keys: &Keys, node: &str) -> Result<u8, KeeperError> {
    let n: i64 = redis::Script::new(ORDINAL_LUA)
        .key(keys.ordinals())
        .key(keys.ordinal_next())
        .arg(node)
        .invoke(conn)
        .map_err(|e| rerr("allocating the node ordinal", e))?;
    match u8::try_from(n) {
        Ok(o) if o >= 1 => Ok(o),
        _ => Err(KeeperError::Ordinals),
    }
}

impl Keeper {
    /// Connects, obtains this node's ordinal (stable per node id) and starts the keeper thread,
    /// which registers the node and keeps its record alive. If Redis cannot be reached within
    /// `connect_timeout`, a node with a `cached_ordinal` starts anyway (down, retrying); one
    /// without gets [`KeeperError::Unavailable`]: a new node joins only through the keeper.
    pub fn start(cfg: KeeperConfig, connect_timeout: Duration) -> Result<Keeper, KeeperError> {
        let client = redis::Client::open(cfg.url.as_str())
            .map_err(|e| KeeperError::BadUrl(format!("{}: {e}", redact(&cfg.url))))?;
        let keys = Keys(cfg.prefix.clone());
        let (conn, ord) = match connect(&client, connect_timeout) {
            Ok(mut c) => {
                let o = ordinal(&mut c, &keys, &cfg.node.id)?;
                if let Some(cached) = cfg.cached_ordinal.filter(|&c| c != o) {
                    warn!(
                        cached,
                        keeper = o,
                        "the keeper gives this node another ordinal than its state dir remembers; using the keeper's"
                    );
                }
                (Some(c), o)
            }
            Err(e) => match cfg.cached_ordinal {
                Some(o) => {
                    warn!(url = %redact(&cfg.url), "keeper unreachable at start ({e}); serving with the remembered ordinal {o} and retrying");
                    (None, o)
                }
                None => {
                    return Err(KeeperError::Unavailable(format!(
                        "{}: {e} (a node joins a cluster for the first time only with the keeper reachable)",
                        redact(&cfg.url)
                    )))
                }
            },
        };
        let (tx, rx) = crossbeam_channel::unbounded();
        let inner = Arc::new(Inner {
            tx,
            up: AtomicBool::new(conn.is_some()),
            ordinal: ord,
            node: cfg.node.id.clone(),
            load: AtomicU64::new(0),
            thread: Mutex::new(None),
        });
        let mut w = Worker {
            client,
            conn,
            keys,
            cfg,
            ordinal: ord,
            inner: Arc::downgrade(&inner),
            pending: HashMap::new(),
            next_try: Instant::now(),
            backoff: Duration::from_millis(100),
            last_hb: None,
            deregister: true,
        };
        if w.conn.is_some() {
            w.heartbeat();
        }
        let t = std::thread::Builder::new()
            .name("keeper".into())
            .spawn(move || w.run(rx))
            .map_err(|e| {
                KeeperError::Unavailable(format!("cannot start the keeper thread: {e}"))
            })?;
        if let Ok(mut g) = inner.thread.lock() {
            *g = Some(t);
        }
        Ok(Keeper(inner))
    }

    /// This node's ordinal: the top byte of every session id it makes.
    pub fn ordinal(&self) -> u8 {
        self.0.ordinal
    }

    /// Whether Redis answered the last time it was asked.
    pub fn is_up(&self) -> bool {
        self.0.up.load(Ordering::Relaxed)
    }

    /// This node's id.
    pub fn node_id(&self) -> &str {
        &self.0.node
    }

    /// A session was made here (epoch 1). Queued; never blocks.
    pub fn created(&self, sid: u32, tenant: u32, agent: u32, caps: u8, token_hash: [u8; 32]) {
        let _ = self.0.tx.send(Cmd::Write(
            sid,
            Write::Created {
                tenant,
                agent,
                caps,
                th: token_hash,
            },
        ));
    }

    /// A session moved here at `epoch`: the record names this node unless it already holds a
    /// newer epoch (repairs a flip or record a Redis fail-over lost). Queued; never blocks.
    pub fn adopted(
        &self,
        sid: u32,
        epoch: u64,
        tenant: u32,
        agent: u32,
        caps: u8,
        token_hash: [u8; 32],
    ) {
        let _ = self.0.tx.send(Cmd::Write(
            sid,
            Write::Adopted {
                epoch,
                tenant,
                agent,
                caps,
                th: token_hash,
            },
        ));
    }

    /// A session ended here: its record goes, only if it still names this node (a stale
    /// ender never deletes a session that moved). Queued; never blocks.
    pub fn ended(&self, sid: u32) {
        let _ = self.0.tx.send(Cmd::Write(sid, Write::Ended));
    }

    /// The node's session count, published with the next heartbeat.
    pub fn set_load(&self, sessions: u64) {
        self.0.load.store(sessions, Ordering::Relaxed);
    }

    /// Flips `sid`'s holder from this node at `from_epoch` to `to_node` at `to_epoch`, atomically
    /// (Lua compare-and-set). `reply` runs on the keeper thread and must not block. No answer
    /// within `timeout`: [`KeeperError::Unavailable`] if it was never sent,
    /// [`KeeperError::Ambiguous`] if it was (the flip may have happened).
    pub fn claim(
        &self,
        sid: u32,
        from_epoch: u64,
        to_node: &str,
        to_epoch: u64,
        timeout: Duration,
        reply: Box<dyn FnOnce(Result<Claim, KeeperError>) + Send>,
    ) {
        let cmd = Cmd::Claim {
            sid,
            from: from_epoch,
            to: to_node.to_string(),
            epoch: to_epoch,
            deadline: Instant::now() + timeout,
            reply,
        };
        if let Err(e) = self.0.tx.send(cmd) {
            if let Cmd::Claim { reply, .. } = e.into_inner() {
                reply(Err(KeeperError::Unavailable(
                    "the keeper thread is gone".into(),
                )));
            }
        }
    }

    /// Where `sid` lives, per the directory (`None`: no record). `reply` runs on the keeper
    /// thread and must not block.
    pub fn lookup(
        &self,
        sid: u32,
        timeout: Duration,
        reply: Box<dyn FnOnce(Result<Option<Entry>, KeeperError>) + Send>,
    ) {
        let cmd = Cmd::Lookup {
            sid,
            deadline: Instant::now() + timeout,
            reply,
        };
        if let Err(e) = self.0.tx.send(cmd) {
            if let Cmd::Lookup { reply, .. } = e.into_inner() {
                reply(Err(KeeperError::Unavailable(
                    "the keeper thread is gone".into(),
                )));
            }
        }
    }

    /// Every node ever registered, with its liveness (blocking: admin only).
    pub fn nodes(&self, timeout: Duration) -> Result<Vec<NodeView>, KeeperError> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.0
            .tx
            .send(Cmd::Nodes(tx))
            .map_err(|_| KeeperError::Unavailable("the keeper thread is gone".into()))?;
        rx.recv_timeout(timeout)
            .map_err(|_| KeeperError::Unavailable("no answer in time".into()))?
    }

    /// Deregisters the node (best effort) and stops the thread (waits up to 2 s).
    pub fn shutdown(&self) {
        self.stop(true);
    }

    /// Stops the thread; `deregister`: remove the node record too (not when another process
    /// of this node took over, a live upgrade, whose heartbeats keep the record).
    pub fn stop(&self, deregister: bool) {
        let _ = self.0.tx.send(Cmd::Stop(deregister));
        let t = self.0.thread.lock().ok().and_then(|mut g| g.take());
        if let Some(t) = t {
            let deadline = Instant::now() + Duration::from_secs(2);
            while !t.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            if t.is_finished() {
                let _ = t.join();
            }
        }
    }
}

struct Worker {
    client: redis::Client,
    conn: Option<redis::Connection>,
    keys: Keys,
    cfg: KeeperConfig,
    ordinal: u8,
    inner: std::sync::Weak<Inner>,
    /// Directory writes not yet in Redis: the latest per session.
    pending: HashMap<u32, Write>,
    next_try: Instant,
    backoff: Duration,
    last_hb: Option<Instant>,
    /// Remove the node record when the thread ends.
    deregister: bool,
}

impl Worker {
    fn set_up(&self, up: bool) {
        if let Some(i) = self.inner.upgrade() {
            let was = i.up.swap(up, Ordering::Relaxed);
            if was && !up {
                warn!(url = %redact(&self.cfg.url), "keeper unreachable; sessions go on, moves wait");
            } else if !was && up {
                info!(url = %redact(&self.cfg.url), "keeper reachable again");
            }
        }
    }

    fn lost(&mut self, e: &KeeperError) {
        if self.conn.take().is_some() {
            tracing::debug!("keeper connection lost: {e}");
        }
        self.set_up(false);
        self.next_try = Instant::now() + self.backoff;
    }

    /// Reconnects when it is time; true when connected.
    fn ensure(&mut self) -> bool {
        if self.conn.is_some() {
            return true;
        }
        if Instant::now() < self.next_try {
            return false;
        }
        match connect(&self.client, Duration::from_millis(500)) {
            Ok(c) => {
                self.conn = Some(c);
                self.backoff = Duration::from_millis(100);
                self.set_up(true);
                self.heartbeat();
                self.conn.is_some()
            }
            Err(e) => {
                self.backoff = (self.backoff * 2).min(Duration::from_secs(2));
                self.next_try = Instant::now() + self.backoff;
                self.set_up(false);
                tracing::debug!("keeper connect failed: {e}");
                false
            }
        }
    }

    /// Refreshes the node record (and the ordinal mapping, should Redis have lost it).
    fn heartbeat(&mut self) {
        self.last_hb = Some(Instant::now());
        let load = self
            .inner
            .upgrade()
            .map_or(0, |i| i.load.load(Ordering::Relaxed));
        let Some(c) = self.conn.as_mut() else { return };
        let n = &self.cfg.node;
        let key = self.keys.node(&n.id);
        let ttl = (self.cfg.heartbeat.as_millis() as u64 * 3).max(1);
        let r = redis::pipe()
            .cmd("HSET")
            .arg(&key)
            .arg("client")
            .arg(&n.client_addr)
            .arg("peer")
            .arg(&n.peer_addr)
            .arg("shards")
            .arg(n.shards)
            .arg("sessions")
            .arg(load)
            .arg("ordinal")
            .arg(self.ordinal)
            .arg("hb")
            .arg(now_ms())
            .ignore()
            .cmd("PEXPIRE")
            .arg(&key)
            .arg(ttl)
            .ignore()
            .cmd("SADD")
            .arg(self.keys.nodes())
            .arg(&n.id)
            .ignore()
            .cmd("HSETNX")
            .arg(self.keys.ordinals())
            .arg(&n.id)
            .arg(self.ordinal)
            .ignore()
            .query::<()>(c);
        if let Err(e) = r {
            let e = rerr("heartbeat", e);
            self.lost(&e);
        }
    }

    /// Sends every queued write in one pipeline.
    fn flush(&mut self) {
        if self.pending.is_empty() || !self.ensure() {
            return;
        }
        let Some(c) = self.conn.as_mut() else { return };
        let me = self.cfg.node.id.clone();
        let mut p = redis::pipe();
        for (sid, w) in &self.pending {
            let key = self.keys.session(*sid);
            match w {
                Write::Created {
                    tenant,
                    agent,
                    caps,
                    th,
                } => {
                    p.cmd("HSET")
                        .arg(&key)
                        .arg("node")
                        .arg(&me)
                        .arg("epoch")
                        .arg(1)
                        .arg("tenant")
                        .arg(tenant)
                        .arg("agent")
                        .arg(agent)
                        .arg("caps")
                        .arg(caps)
                        .arg("th")
                        .arg(hex::encode(th))
                        .ignore();
                }
                Write::Adopted {
                    epoch,
                    tenant,
                    agent,
                    caps,
                    th,
                } => {
                    p.cmd("EVAL")
                        .arg(ADOPT_LUA)
                        .arg(1)
                        .arg(&key)
                        .arg(&me)
                        .arg(epoch)
                        .arg(tenant)
                        .arg(agent)
                        .arg(hex::encode(th))
                        .arg(caps)
                        .ignore();
                }
                Write::Ended => {
                    p.cmd("EVAL")
                        .arg(ENDED_LUA)
                        .arg(1)
                        .arg(&key)
                        .arg(&me)
                        .ignore();
                }
            }
        }
        match p.query::<()>(c) {
            Ok(()) => self.pending.clear(),
            Err(e) => {
                let e = rerr("directory writes", e);
                self.lost(&e);
            }
        }
    }

    fn do_claim(
        &mut self,
        sid: u32,
        from: u64,
        to: &str,
        epoch: u64,
        deadline: Instant,
    ) -> Result<Claim, KeeperError> {
        let deadline_ms = now_ms()
            + deadline
                .saturating_duration_since(Instant::now())
                .as_millis() as u64;
        // A connection that died unnoticed fails here, before the flip is sent: that failure
        // is a plain "unavailable", never an ambiguous one.
        let alive = self
            .conn
            .as_mut()
            .is_some_and(|c| redis::cmd("PING").query::<String>(c).is_ok());
        if !alive {
            self.conn = None;
            self.next_try = Instant::now();
            if !self.ensure() {
                return Err(KeeperError::Unavailable("not connected".into()));
            }
        }
        let c = self
            .conn
            .as_mut()
            .ok_or_else(|| KeeperError::Unavailable("not connected".into()))?;
        let r: redis::RedisResult<(String, String, String)> = redis::Script::new(CLAIM_LUA)
            .key(self.keys.session(sid))
            .arg(&self.cfg.node.id)
            .arg(from.to_string())
            .arg(to)
            .arg(epoch.to_string())
            .arg(deadline_ms.to_string())
            .invoke(c);
        match r {
            Ok((k, node, e)) => Ok({
                match k.as_str() {
                    "late" => {
                        return Err(KeeperError::Unavailable(
                            "the flip reached the keeper after its deadline; not done".into(),
                        ))
                    }
                    "done" => Claim::Done,
                    "missing" => Claim::Missing,
                    _ => Claim::Stale {
                        node,
                        epoch: e.parse().unwrap_or(0),
                    },
                }
            }),
            Err(e) => {
                let k = rerr("flip", e);
                self.lost(&k);
                Err(match k {
                    KeeperError::Unavailable(m) => KeeperError::Ambiguous(m),
                    other => other,
                })
            }
        }
    }

    fn do_lookup(&mut self, sid: u32) -> Result<Option<Entry>, KeeperError> {
        let c = self
            .conn
            .as_mut()
            .ok_or_else(|| KeeperError::Unavailable("not connected".into()))?;
        let r: redis::RedisResult<HashMap<String, String>> =
            redis::cmd("HGETALL").arg(self.keys.session(sid)).query(c);
        match r {
            Ok(h) => Ok(entry(&h)),
            Err(e) => {
                let k = rerr("lookup", e);
                self.lost(&k);
                Err(k)
            }
        }
    }

    fn do_nodes(&mut self) -> Result<Vec<NodeView>, KeeperError> {
        let c = self
            .conn
            .as_mut()
            .ok_or_else(|| KeeperError::Unavailable("not connected".into()))?;
        let res = (|| -> redis::RedisResult<Vec<NodeView>> {
            let ids: Vec<String> = redis::cmd("SMEMBERS").arg(self.keys.nodes()).query(c)?;
            let ords: HashMap<String, u8> =
                redis::cmd("HGETALL").arg(self.keys.ordinals()).query(c)?;
            let mut p = redis::pipe();
            for id in &ids {
                p.cmd("HGETALL").arg(self.keys.node(id));
            }
            let recs: Vec<HashMap<String, String>> = p.query(c)?;
            let now = now_ms();
            let mut out: Vec<NodeView> = ids
                .into_iter()
                .zip(recs)
                .map(|(id, h)| {
                    let get = |k: &str| h.get(k).cloned().unwrap_or_default();
                    NodeView {
                        ordinal: ords.get(&id).copied().unwrap_or(0),
                        alive: !h.is_empty(),
                        client_addr: get("client"),
                        peer_addr: get("peer"),
                        sessions: get("sessions").parse().unwrap_or(0),
                        shards: get("shards").parse().unwrap_or(0),
                        heartbeat_age_ms: get("hb")
                            .parse::<u64>()
                            .map_or(u64::MAX, |hb| now.saturating_sub(hb)),
                        id,
                    }
                })
                .collect();
            out.sort_by(|a, b| a.id.cmp(&b.id));
            Ok(out)
        })();
        res.map_err(|e| {
            let k = rerr("nodes", e);
            self.lost(&k);
            k
        })
    }

    fn handle(&mut self, cmd: Cmd) -> bool {
        match cmd {
            Cmd::Write(sid, w) => {
                self.pending.insert(sid, w);
            }
            Cmd::Claim {
                sid,
                from,
                to,
                epoch,
                deadline,
                reply,
            } => {
                if Instant::now() >= deadline {
                    reply(Err(KeeperError::Unavailable(
                        "timed out in the queue".into(),
                    )));
                } else if !self.ensure() {
                    reply(Err(KeeperError::Unavailable("not connected".into())));
                } else {
                    // The session's own queued write goes first (its record must exist).
                    self.flush();
                    reply(self.do_claim(sid, from, &to, epoch, deadline));
                }
            }
            Cmd::Lookup {
                sid,
                deadline,
                reply,
            } => {
                if Instant::now() >= deadline || !self.ensure() {
                    reply(Err(KeeperError::Unavailable("not connected".into())));
                } else {
                    self.flush();
                    reply(self.do_lookup(sid));
                }
            }
            Cmd::Nodes(tx) => {
                let r = if self.ensure() {
                    self.do_nodes()
                } else {
                    Err(KeeperError::Unavailable("not connected".into()))
                };
                let _ = tx.send(r);
            }
            Cmd::Stop(deregister) => {
                self.deregister = deregister;
                return false;
            }
        }
        true
    }

    fn run(mut self, rx: Receiver<Cmd>) {
        loop {
            let wait = match self.last_hb {
                Some(t) => self.cfg.heartbeat.saturating_sub(t.elapsed()),
                None => Duration::ZERO,
            };
            let wait = if self.conn.is_none() {
                wait.min(self.next_try.saturating_duration_since(Instant::now()))
            } else {
                wait
            };
            match rx.recv_timeout(wait.max(Duration::from_millis(1))) {
                Ok(cmd) => {
                    if !self.handle(cmd) {
                        break;
                    }
                    // Everything queued meanwhile, then one pipeline for the writes.
                    let mut stop = false;
                    for _ in 0..100_000 {
                        match rx.try_recv() {
                            Ok(c) => {
                                if !self.handle(c) {
                                    stop = true;
                                    break;
                                }
                            }
                            Err(_) => break,
                        }
                    }
                    if stop {
                        break;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            self.flush();
            if self
                .last_hb
                .is_none_or(|t| t.elapsed() >= self.cfg.heartbeat)
            {
                if self.ensure() {
                    self.heartbeat();
                } else {
                    self.last_hb = Some(Instant::now());
                }
            }
        }
        // Leaving: what is queued goes, and the node record with it.
        self.flush();
        if !self.deregister {
            return;
        }
        if let Some(c) = self.conn.as_mut() {
            let _ = redis::cmd("DEL")
                .arg(self.keys.node(&self.cfg.node.id))
                .query::<()>(c);
        }
    }
}

fn entry(h: &HashMap<String, String>) -> Option<Entry> {
    let node = h.get("node")?.clone();
    let mut th = [0u8; 32];
    hex::decode_to_slice(h.get("th").map_or("", String::as_str), &mut th).ok()?;
    Some(Entry {
        node,
        epoch: h.get("epoch")?.parse().ok()?,
        tenant: h.get("tenant")?.parse().ok()?,
        agent: h.get("agent")?.parse().ok()?,
        caps: h.get("caps").and_then(|c| c.parse().ok()).unwrap_or(0),
        token_hash: th,
    })
}

#[cfg(test)]
mod tests;
