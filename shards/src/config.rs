//! What a runtime is asked to be: the backend, shard count and placement, listeners,
//! watermarks and limits ([`Config`]), and the CPU-list syntax its callers parse.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::str::FromStr;

use crate::BpfInsn;

/// Which I/O backend to use.
#[derive(Copy, Clone, PartialEq, Eq, Hash, Debug, Default)]
pub enum IoMode {
    /// io_uring when [`probe_uring`](crate::probe_uring) succeeds, epoll otherwise (with a warning).
    #[default]
    Auto,
    /// io_uring or fail.
    Uring,
    /// epoll.
    Epoll,
}

impl FromStr for IoMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(IoMode::Auto),
            "uring" | "io_uring" | "io-uring" => Ok(IoMode::Uring),
            "epoll" => Ok(IoMode::Epoll),
            other => Err(format!(
                "invalid io mode {other:?}: expected \"auto\", \"uring\" or \"epoll\""
            )),
        }
    }
}

impl fmt::Display for IoMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IoMode::Auto => "auto",
            IoMode::Uring => "uring",
            IoMode::Epoll => "epoll",
        })
    }
}

/// The backend actually running.
#[derive(Copy, Clone, PartialEq, Eq, Hash, Debug)]
pub enum Backend {
    Uring,
    Epoll,
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Backend::Uring => "io_uring",
            Backend::Epoll => "epoll",
        })
    }
}

/// Runtime configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// Number of reactor threads (>= 1).
    pub shards: usize,
    /// Per shard: CPU to pin to (`None` = don't pin). `len() == shards` (an empty vector
    /// means "pin nothing").
    pub cpus: Vec<Option<usize>>,
    pub io: IoMode,
    /// TCP listener, one SO_REUSEPORT socket per shard. Port 0 = pick a free port.
    pub listen: Option<SocketAddr>,
    /// Further TCP listeners, one SO_REUSEPORT socket per shard each (port 0 = pick a free
    /// port). A connection accepted on `extra_listen[i]` reaches
    /// [`Handler::on_accept_at`](crate::Handler::on_accept_at) with listener `i + 1`; `listen`
    /// is listener 0.
    pub extra_listen: Vec<SocketAddr>,
    /// Listen backlog.
    pub backlog: i32,
    /// Provided-buffer size for receives (and the epoll scratch buffer size).
    pub buf_size: usize,
    /// Provided buffers per shard (power of two, <= 32768).
    pub bufs_per_shard: u16,
    /// Output queue bytes above which a conn is "backpressured".
    pub high_watermark: usize,
    /// `on_writable` fires when a backpressured queue drains below this.
    pub low_watermark: usize,
    /// UDP socket, one SO_REUSEPORT socket per shard on the same port (port 0 = pick one).
    /// Datagrams arrive in [`Handler::on_datagram`](crate::Handler::on_datagram); [`Ctx::send_datagram`](crate::Ctx::send_datagram) sends.
    pub udp: Option<SocketAddr>,
    /// A classic BPF program attached to the UDP reuseport group: it runs on each datagram
    /// (offset 0 = the UDP payload) and returns the index of the shard that gets it; an index
    /// that is out of range falls back to the kernel's 4-tuple hash. If attaching fails the
    /// runtime starts anyway without it (logged), so handlers must cope with datagrams that
    /// reach the wrong shard.
    pub udp_steering: Option<Vec<BpfInsn>>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            shards: 1,
            cpus: vec![None],
            io: IoMode::Auto,
            listen: None,
            extra_listen: Vec::new(),
            backlog: 4096,
            buf_size: 16 * 1024,
            bufs_per_shard: 256,
            high_watermark: 1024 * 1024,
            low_watermark: 256 * 1024,
            udp: None,
            udp_steering: None,
        }
    }
}

impl Config {
    pub(crate) fn validate(&self) -> io::Result<()> {
        let bad = |m: String| Err(io::Error::new(io::ErrorKind::InvalidInput, m));
        if self.shards == 0 {
            return bad("shards must be >= 1".into());
        }
        if !self.cpus.is_empty() && self.cpus.len() != self.shards {
            return bad(format!(
                "cpus has {} entries but shards is {}",
                self.cpus.len(),
                self.shards
            ));
        }
        if self.buf_size == 0 || self.buf_size > u32::MAX as usize {
            return bad(format!("invalid buf_size {}", self.buf_size));
        }
        if !self.bufs_per_shard.is_power_of_two() || self.bufs_per_shard > 32768 {
            return bad(format!(
                "bufs_per_shard must be a power of two <= 32768, got {}",
                self.bufs_per_shard
            ));
        }
        if self.low_watermark > self.high_watermark {
            return bad("low_watermark must be <= high_watermark".into());
        }
        Ok(())
    }
}

/// Parse a Linux-style CPU list: `"0,2-3"` -> `[0, 2, 3]` (sorted, de-duplicated).
pub fn parse_cpu_list(s: &str) -> Result<Vec<usize>, String> {
    let mut out = Vec::new();
    if s.trim().is_empty() {
        return Err("empty CPU list".into());
    }
    for part in s.split(',') {
        let part = part.trim();
        if part.is_empty() {
            return Err(format!("empty element in CPU list {s:?}"));
        }
        let num = |t: &str| -> Result<usize, String> {
            t.trim()
                .parse::<usize>()
                .map_err(|_| format!("invalid CPU number {:?} in CPU list {s:?}", t.trim()))
        };
        if let Some((a, b)) = part.split_once('-') {
            let (a, b) = (num(a)?, num(b)?);
            if a > b {
                return Err(format!("reversed CPU range {part:?} in CPU list {s:?}"));
            }
            if b - a > 65536 {
                return Err(format!("CPU range {part:?} is too large"));
            }
            out.extend(a..=b);
        } else {
            out.push(num(part)?);
        }
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}
