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
            quic_port: None,
        }
    }
}
