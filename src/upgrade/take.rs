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

/// A hand-over under way: the old process accepted and gave the state dir's lock and its
/// listening sockets; this process starts its shards (accepting paused), then
/// [`Taking::receive`]s the sessions, shard by shard.
pub struct Taking {
    /// The state dir's lock (shared with the old process until it exits).
    pub lock: Option<OwnedFd>,
    /// The listening sockets, to start the runtime with (paused).
    pub sockets: Option<shards::Inherited>,
    channel: Channel,
    shards: usize,
    /// When the hand-over started (the HELLO).
    pub started: Instant,
}

/// One shard's part of the hand-over.
#[derive(Default)]
pub struct ShardPart {
    /// Session records.
    pub records: Vec<Vec<u8>>,
    /// Its connections and links.
    pub moved: Moved,
    /// Client input held for its pods that are away.
    pub held: crate::state::Held,
}

/// What moved, in all.
#[derive(Clone, Copy, Debug, Default)]
pub struct Counts {
    pub sessions: usize,
    pub conns: usize,
    pub links: usize,
    /// Bytes received on the upgrade socket.
    pub bytes: u64,
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

/// Connects to the running clawtermd of `dir`: HELLO, and its ACCEPT with the state dir's
/// lock and the listening sockets. Nothing is frozen yet.
pub fn connect(dir: &Path, shards: usize) -> Result<Taking, TakeError> {
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
    let (tcp, udp, udp_steered, open) = match decode(&b)? {
        Msg::Refuse(why) => return Err(TakeError::Refused(why.to_string())),
        Msg::Accept {
            version: v,
            shards: n,
            tcp,
            udp,
            udp_steered,
            open,
        } if v == VERSION && n as usize == shards => {
            (tcp as usize, udp as usize, udp_steered, open as usize)
        }
        other => return Err(bad(format!("unexpected answer to HELLO: {other:?}")).into()),
    };
    let mut fds = ch.take_fds(1 + tcp + udp)?;
    let udp_fds = fds.split_off(1 + tcp);
    let mut tcp_fds = fds.split_off(1);
    let lock = fds.pop().ok_or_else(|| bad("no lock descriptor"))?;
    // The main listeners (one per shard), then each extra listener's (WebSocket), `shards`
    // at a time; an old process without extra listeners sends just the main ones.
    let mut extra = Vec::new();
    if tcp_fds.len() > shards && shards > 0 {
        let mut rest = tcp_fds.split_off(shards);
        while rest.len() >= shards {
            let tail = rest.split_off(shards);
            extra.push(rest);
            rest = tail;
        }
    }
    // Room for every descriptor to come, before this process's shard threads start (see
    // `fdtable`): with them running, each doubling of the table would wait for an RCU grace
    // period in the middle of the hand-over.
    crate::server::fdtable::reserve(&lock, open + 1024);
    Ok(Taking {
        lock: Some(lock),
        sockets: Some(shards::Inherited {
            tcp: tcp_fds,
            extra,
            udp: udp_fds,
            udp_steered,
            paused: true,
        }),
        channel: ch,
        shards,
        started,
    })
}

/// Shard `s`'s part, while it is still being received.
fn part(per: &mut [Option<ShardPart>], s: u16) -> io::Result<(usize, &mut ShardPart)> {
    let i = s as usize;
    match per.get_mut(i) {
        Some(Some(p)) => Ok((i, p)),
        Some(None) => Err(bad(format!("shard {s}'s part came after its end"))),
        None => Err(bad(format!("shard {s} out of range"))),
    }
}

impl Taking {
    /// Says START (this process's shards run), then takes the sessions in, one shard at a
    /// time: each shard's part goes to `on_shard` as soon as it is complete (SHARD), which
    /// returns once that shard serves it; SHARD_IN then tells the old process to freeze the
    /// next. Returns once DONE came and every count matched.
    pub fn receive(
        &mut self,
        mut on_shard: impl FnMut(usize, ShardPart) -> io::Result<()>,
    ) -> Result<Counts, TakeError> {
        let shards = self.shards;
        let ch = &mut self.channel;
        ch.send(&Msg::Start)?;
        let mut per: Vec<Option<ShardPart>> =
            (0..shards).map(|_| Some(Default::default())).collect();
        let mut got = vec![(0usize, 0usize, 0usize); shards];
        let (mut sessions, mut conns, mut links) = (0usize, 0usize, 0usize);
        loop {
            let b = ch.recv()?;
            let m = decode(&b)?;
            let mut fds = ch.take_fds(m.fds())?;
            match m {
                Msg::Session { shard, record } => {
                    let (i, p) = part(&mut per, shard)?;
                    p.records.push(record.to_vec());
                    got[i].0 += 1;
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
                    let (i, p) = part(&mut per, shard)?;
                    p.moved.conns.push(MovedConn {
                        sid,
                        peer: peer.to_string(),
                        fd,
                        unread: unread.to_vec(),
                        unsent: unsent.to_vec(),
                    });
                    got[i].1 += 1;
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
                    let (i, p) = part(&mut per, shard)?;
                    p.moved.links.push(MovedLink {
                        key: (tenant, agent),
                        hello_seen,
                        fd,
                        unread: unread.to_vec(),
                        unsent: unsent.to_vec(),
                    });
                    got[i].2 += 1;
                    links += 1;
                }
                Msg::Held {
                    shard,
                    tenant,
                    agent,
                    bytes,
                } => {
                    let (_, p) = part(&mut per, shard)?;
                    p.held
                        .entry((tenant, agent))
                        .or_default()
                        .extend_from_slice(bytes);
                }
                Msg::ShardEnd {
                    shard,
                    sessions: s,
                    conns: c,
                    links: l,
                } => {
                    let (i, _) = part(&mut per, shard)?;
                    if (s as usize, c as usize, l as usize) != got[i] || ch.spare_fds() != 0 {
                        return Err(bad(format!(
                            "SHARD {shard} says {s} sessions, {c} connections, {l} links; {:?} came",
                            got[i]
                        ))
                        .into());
                    }
                    if let Some(p) = per[i].take() {
                        on_shard(i, p)?;
                    }
                    // That shard serves its part: the old process may freeze the next.
                    ch.send(&Msg::ShardIn { shard })?;
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
                    if let Some(i) = per.iter().position(Option::is_some) {
                        return Err(bad(format!("DONE before shard {i}'s part ended")).into());
                    }
                    break;
                }
                other => {
                    return Err(bad(format!("unexpected {other:?} during the hand-over")).into())
                }
            }
        }
        Ok(Counts {
            sessions,
            conns,
            links,
            bytes: ch.received,
        })
    }

    /// Tells the old process this one failed (it then exits if it had frozen: the state
    /// dir's journals hold every session; before START it serves on).
    pub fn fail(&mut self, why: &dyn std::fmt::Display) {
        let _ = self.channel.send(&Msg::Failed(&why.to_string()));
    }

    /// Tells the old process this one serves: it releases what it kept and exits.
    pub fn ready(&mut self) -> io::Result<()> {
        self.channel.send(&Msg::Ready)
    }
}
