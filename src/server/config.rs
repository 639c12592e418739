//! Server settings.

use crate::session::SessionConfig;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;

/// How CONNECT tokens are checked.
#[derive(Clone, Debug)]
pub enum Auth {
    /// Accept any token (`--insecure-no-auth`).
    NoAuth,
    /// The tokens file (PROTOCOL.md §5).
    Tokens(PathBuf),
}

/// Everything a shard needs to know; built from the command line.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub bind: IpAddr,
    pub port: u16,
    pub socket_dir: PathBuf,
    pub auth: Auth,
    pub shards: usize,
    pub cpus: Vec<Option<usize>>,
    pub io: shards::IoMode,
    pub session: SessionConfig,
    /// Sessions per node, suspended ones included (`--max-sessions`).
    pub max_sessions: Option<usize>,
    /// Connections per shard that have not completed a handshake yet.
    pub max_pending_handshakes: usize,
    pub handshake_ms: u64,
    pub allow_legacy_resume: bool,
    pub agent_grace_ms: u64,
    /// The state dir (`--state-dir`): sessions outlive the process; `None`: they do not.
    pub state_dir: Option<PathBuf>,
    /// Take a running clawtermd's state dir over (`--upgrade`).
    pub upgrade: bool,
    /// TLS certificate chain and key (PEM); `None` = plaintext (`--insecure-plaintext`).
    pub tls: Option<(PathBuf, PathBuf)>,
    /// New connections per second per source address, per shard (0 = unlimited).
    pub conn_rate_per_ip: u32,
    /// Failed authentications per minute per source address, per shard, before that address
    /// is refused with RATE_LIMITED for the rest of the minute (0 = unlimited).
    pub max_auth_failures_per_ip: u32,
    /// Admin endpoint (`/metrics`, `/healthz`, `/readyz`); `None` = off.
    pub admin: Option<std::net::SocketAddr>,
    /// UDP port for QUIC (0 = pick one); `None` = QUIC off. QUIC needs TLS (`tls`).
    pub quic_port: Option<u16>,
    /// ClawRoam (`--keeper`): `None` = one node on its own.
    pub cluster: Option<ClusterConfig>,
    /// The WebSocket port and the browser terminal page; `None` = off (`--no-ws`).
    pub ws: Option<WsSettings>,
}

/// The WebSocket port (`--ws-port`) and what it serves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WsSettings {
    /// TCP port (0 = pick one).
    pub port: u16,
    /// The page's files (`--web-root`); `None`: the default places.
    pub web_root: Option<PathBuf>,
    /// Further origins allowed (`--ws-origin`).
    pub origins: Vec<String>,
    /// Largest client message.
    pub max_message: u64,
}

/// A node of a cluster (docs/CLUSTER.md).
#[derive(Clone)]
pub struct ClusterConfig {
    /// This node's name (`--node-id`).
    pub node_id: String,
    /// The keeper's Redis URL (`--keeper`).
    pub keeper: String,
    /// Where clients reach this node (`--advertise`; ROAM frames carry it).
    pub advertise: std::net::SocketAddr,
    /// Whether `--advertise` named a port (otherwise it follows the bound port, e.g. 0).
    pub advertise_port_given: bool,
    /// Where the peer link listens (bind address, `--peer-port`).
    pub peer_bind: std::net::SocketAddr,
    /// Where other nodes reach the peer link.
    pub peer_advertise: std::net::SocketAddr,
    /// The cluster secret (`--cluster-secret`), at least 16 bytes.
    pub secret: Vec<u8>,
}

impl std::fmt::Debug for ClusterConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterConfig")
            .field("node_id", &self.node_id)
            .field("keeper", &crate::cluster::keeper::redact(&self.keeper))
            .field("advertise", &self.advertise)
            .field("peer_bind", &self.peer_bind)
            .field("peer_advertise", &self.peer_advertise)
            .field("secret", &"<redacted>")
            .finish()
    }
}

/// The host name, for `--node-id`'s default.
pub fn host_name() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            bind: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            port: 7220,
            socket_dir: PathBuf::from("/run/claw/sockets"),
            auth: Auth::NoAuth,
            shards: 1,
            cpus: vec![None],
            io: shards::IoMode::Auto,
            session: SessionConfig::default(),
            max_sessions: None,
            max_pending_handshakes: 1024,
            handshake_ms: 10_000,
            allow_legacy_resume: false,
            agent_grace_ms: 60_000,
            state_dir: None,
            upgrade: false,
            tls: None,
            conn_rate_per_ip: 10_000,
            max_auth_failures_per_ip: 30,
            admin: None,
            ws: None,
            quic_port: None,
            cluster: None,
        }
    }
}
