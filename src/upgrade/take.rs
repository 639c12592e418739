//! The `--upgrade` process's side: take a running clawtermd's place (see [`crate::upgrade`]).

use super::channel::{decode, Channel};
use super::old::SOCKET;
use super::wire::{Msg, VERSION};
use super::{MovedConn, MovedLink};
use crate::server::shard::Moved;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// What the old process handed over.
pub struct Taken {
    /// The state dir's lock (shared with the old process until it exits).
    pub lock: OwnedFd,
    pub sockets: shards::Inherited,
    /// Per shard: session records, and the connections and links.
    pub shards: Vec<(Vec<Vec<u8>>, Moved)>,
    /// Per shard: client input held for pods that are away.
    pub held: Vec<crate::state::Held>,
    /// To say READY (or FAILED) once this process serves.
    pub channel: Channel,
    pub sessions: usize,
    pub conns: usize,
    pub links: usize,
    /// When the hand-over started (the HELLO).
    pub started: Instant,
}

/// Why taking over did not happen.
#[derive(Debug, thiserror::Error)]
pub enum TakeError {
    /// The old process said no: nothing moved, it serves on.
    #[error("the running clawtermd refused the upgrade: {0} (it keeps serving)")]
    Refused(String),
    #[error("cannot reach the running clawtermd's upgrade socket {path}: {source}")]
    Connect {
        path: std::path::PathBuf,
        source: io::Error,
    },
    #[error("live upgrade failed: {0}")]
    Io(#[from] io::Error),
}

fn bad(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.into())
}

/// Connects to the running clawtermd of `dir` and takes everything over.
pub fn take_over(dir: &Path, shards: usize) -> Result<Taken, TakeError> {
    let path = dir.join(SOCKET);
    let stream = UnixStream::connect(&path).map_err(|source| TakeError::Connect {
        path: path.clone(),
        source,
    })?;
    let started = Instant::now();
    let mut ch = Channel::new(stream, Duration::from_secs(30))?;
    // A test hook: speak another hand-off version, to check that it is refused cleanly.
    let version = std::env::var("CLAWTERMD_TEST_UPGRADE_VERSION")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(VERSION);
    ch.send(&Msg::Hello {
        version,
        pid: std::process::id(),
        shards: shards as u16,
    })?;
    let b = ch.recv()?;
    let (tcp, udp, udp_steered) = match decode(&b)? {
        Msg::Refuse(why) => return Err(TakeError::Refused(why.to_string())),
        Msg::Accept {
            version: v,
            shards: n,
            tcp,
            udp,
            udp_steered,
        } if v == VERSION && n as usize == shards => (tcp as usize, udp as usize, udp_steered),
        other => return Err(bad(format!("unexpected answer to HELLO: {other:?}")).into()),
    };
    let mut fds = ch.take_fds(1 + tcp + udp)?;
    let udp_fds = fds.split_off(1 + tcp);
    let tcp_fds = fds.split_off(1);
    let lock = fds.pop().ok_or_else(|| bad("no lock descriptor"))?;
    let mut per: Vec<(Vec<Vec<u8>>, Moved)> = (0..shards).map(|_| Default::default()).collect();
    let mut held: Vec<crate::state::Held> = (0..shards).map(|_| Default::default()).collect();
    let (mut sessions, mut conns, mut links) = (0usize, 0usize, 0usize);
    loop {
        let b = ch.recv()?;
        let m = decode(&b)?;
        let mut fds = ch.take_fds(m.fds())?;
        let shard_of = |s: u16| -> io::Result<usize> {
            if (s as usize) < shards {
                Ok(s as usize)
            } else {
                Err(bad(format!("shard {s} out of range")))
            }
        };
        match m {
            Msg::Session { shard, record } => {
                per[shard_of(shard)?].0.push(record.to_vec());
                sessions += 1;
            }
            Msg::Conn {
                shard,
                sid,
                peer,
                unread,
                unsent,
            } => {
                let fd = fds.pop().ok_or_else(|| bad("CONN without its socket"))?;
                per[shard_of(shard)?].1.conns.push(MovedConn {
                    sid,
                    peer: peer.to_string(),
                    fd,
                    unread: unread.to_vec(),
                    unsent: unsent.to_vec(),
                });
                conns += 1;
            }
            Msg::Link {
                shard,
                tenant,
                agent,
                hello_seen,
                unread,
                unsent,
            } => {
                let fd = fds.pop().ok_or_else(|| bad("LINK without its socket"))?;
                per[shard_of(shard)?].1.links.push(MovedLink {
                    key: (tenant, agent),
                    hello_seen,
                    fd,
                    unread: unread.to_vec(),
                    unsent: unsent.to_vec(),
                });
                links += 1;
            }
            Msg::Held {
                shard,
                tenant,
                agent,
                bytes,
            } => {
                held[shard_of(shard)?]
                    .entry((tenant, agent))
                    .or_default()
                    .extend_from_slice(bytes);
            }
            Msg::Done {
                sessions: s,
                conns: c,
                links: l,
            } => {
                if (s as usize, c as usize, l as usize) != (sessions, conns, links)
                    || ch.spare_fds() != 0
                {
                    return Err(bad(format!(
                        "DONE says {s} sessions, {c} connections, {l} links; {sessions}, {conns}, {links} came"
                    ))
                    .into());
                }
                break;
            }
            other => return Err(bad(format!("unexpected {other:?} during the hand-over")).into()),
        }
    }
    Ok(Taken {
        lock,
        sockets: shards::Inherited {
            tcp: tcp_fds,
            udp: udp_fds,
            udp_steered,
        },
        shards: per,
        held,
        channel: ch,
        sessions,
        conns,
        links,
        started,
    })
}
