//! The running clawtermd's side of a live upgrade: it listens on `DIR/upgrade.sock` and, when
//! an `--upgrade` process says HELLO in its format, hands everything over (see the module
//! [`crate::upgrade`]).

use super::channel::{decode, Channel};
use super::wire::{Msg, VERSION};
use super::ShardExport;
use crate::server::metrics::Metrics;
use crate::server::shard::ShardMsg;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{error, info, warn};

/// The socket's name in the state dir.
pub const SOCKET: &str = "upgrade.sock";

/// What the old process needs to hand itself over.
pub struct Source {
    /// The shards.
    pub remote: shards::Remote<ShardMsg>,
    /// New descriptors of the listening sockets.
    pub sockets: Box<dyn Fn() -> io::Result<shards::Inherited> + Send>,
    /// The state dir's lock (a new descriptor of it).
    pub lock: OwnedFd,
    pub shards: usize,
    pub metrics: Arc<Metrics>,
    /// Set once everything is handed over and the new process serves: this one exits.
    pub done: Arc<AtomicBool>,
    /// Set (with `done`) when a hand-over failed after the shards froze: this process holds
    /// nothing any more and exits with an error, so that a restart on the state dir (whose
    /// journals hold every session as of the freeze) brings the sessions back. It never hands
    /// over twice.
    pub failed: Arc<AtomicBool>,
}

/// The listening side; the socket file is removed when dropped, unless it is another's by
/// then (the process that took over binds its own at the same path).
pub struct Serving {
    path: PathBuf,
    id: Option<(u64, u64, i64, i64)>,
    /// Set once handed over: the path is the new process's then.
    done: Arc<AtomicBool>,
}

/// What tells one socket file from another that took its place (an inode number alone may be
/// reused at once).
fn file_id(path: &Path) -> Option<(u64, u64, i64, i64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino(), m.ctime(), m.ctime_nsec()))
}

impl Drop for Serving {
    fn drop(&mut self) {
        if !self.done.load(Ordering::SeqCst) && self.id.is_some() && file_id(&self.path) == self.id
        {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Listens on `dir/upgrade.sock` on a thread of its own. The state dir's lock is held, so a
/// socket file there is a dead process's: it is replaced.
pub fn serve(dir: &Path, src: Source) -> io::Result<Serving> {
    let path = dir.join(SOCKET);
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)?;
    let id = file_id(&path);
    let done = src.done.clone();
    std::thread::Builder::new()
        .name("upgrade".into())
        .spawn(move || {
            for stream in listener.incoming() {
                let stream = match stream {
                    Ok(s) => s,
                    Err(e) => {
                        warn!("upgrade socket: accept failed: {e}");
                        std::thread::sleep(Duration::from_millis(100));
                        continue;
                    }
                };
                let mut frozen = false;
                match hand_over(stream, &src, &mut frozen) {
                    Ok(true) => {
                        src.done.store(true, Ordering::SeqCst);
                        crate::server::daemon::wake();
                        return;
                    }
                    Ok(false) => {}
                    Err(e) if frozen => {
                        src.metrics.upgrades_failed.fetch_add(1, Ordering::Relaxed);
                        error!(
                            "upgrade failed after the shards froze: {e}; this clawtermd holds nothing any more and exits: the state dir's journals hold every session"
                        );
                        src.failed.store(true, Ordering::SeqCst);
                        src.done.store(true, Ordering::SeqCst);
                        crate::server::daemon::wake();
                        return;
                    }
                    Err(e) => {
                        src.metrics.upgrades_failed.fetch_add(1, Ordering::Relaxed);
                        error!("upgrade failed before anything moved: {e}; serving on");
                    }
                }
            }
        })?;
    Ok(Serving { path, id, done })
}

/// One upgrade attempt. `Ok(false)`: refused before anything moved (this process serves on);
/// `Ok(true)`: handed over, the new process serves.
fn hand_over(stream: UnixStream, src: &Source, frozen: &mut bool) -> io::Result<bool> {
    let mut ch = Channel::new(stream, Duration::from_secs(30))?;
    let hello = ch.recv()?;
    let (version, pid, shards) = match decode(&hello)? {
        Msg::Hello {
            version,
            pid,
            shards,
        } => (version, pid, shards),
        other => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("expected HELLO on the upgrade socket, got {other:?}"),
            ))
        }
    };
    let refuse = |ch: &mut Channel, why: String| -> io::Result<bool> {
        warn!(new_pid = pid, "upgrade refused: {why}; serving on");
        src.metrics.upgrades_refused.fetch_add(1, Ordering::Relaxed);
        ch.send(&Msg::Refuse(&why))?;
        Ok(false)
    };
    if version != VERSION {
        return refuse(
            &mut ch,
            format!(
                "hand-off format {version}; the running clawtermd (pid {}) speaks {VERSION}",
                std::process::id()
            ),
        );
    }
    if shards as usize != src.shards {
        return refuse(
            &mut ch,
            format!(
                "the running clawtermd (pid {}) has {} shards and hands each one's listener and sessions to the same shard: start the new one with --shards {}",
                std::process::id(),
                src.shards,
                src.shards
            ),
        );
    }
    let started = Instant::now();
    info!(new_pid = pid, "upgrade: handing over to the new clawtermd");
    let sockets = (src.sockets)()?;
    let lock = src.lock.try_clone()?;
    let mut fds: Vec<OwnedFd> = vec![lock];
    // The extra listeners (WebSocket) travel as further TCP listeners after the main ones,
    // `shards` of each: a new process that has none of them takes the first `shards` only.
    let extra: usize = sockets.extra.iter().map(Vec::len).sum();
    let (tcp, udp) = ((sockets.tcp.len() + extra) as u16, sockets.udp.len() as u16);
    fds.extend(sockets.tcp);
    fds.extend(sockets.extra.into_iter().flatten());
    fds.extend(sockets.udp);
    ch.send_with_fds(
        &Msg::Accept {
            version: VERSION,
            shards,
            tcp,
            udp,
            udp_steered: sockets.udp_steered,
            open: crate::server::fdtable::table_size().unwrap_or(0) as u32,
        },
        &fds,
    )?;
    drop(fds);
    // The new process starts its shards (accepting paused) and says START: only then does
    // anything freeze here, so its start-up is not part of any session's pause.
    expect(&mut ch, pid, &Msg::Start, "could not start")?;
    // Every shard stops accepting (the new process's shards take the queued connections once
    // all of them have their part) and from now on keeps a RESUME for another shard's session
    // unread, so that no connection is handed to a shard that has moved.
    *frozen = true;
    let frozen_at = Instant::now();
    let (qtx, qrx) = crossbeam_channel::unbounded::<usize>();
    for i in 0..src.shards {
        src.remote.send(i, ShardMsg::Quiesce(qtx.clone()));
    }
    for _ in 0..src.shards {
        qrx.recv_timeout(Duration::from_secs(10)).map_err(|_| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                "a shard did not stop accepting within 10 s; its sessions are in the state dir",
            )
        })?;
    }
    // Then the shards move one at a time: each freezes only for its own part, while the others
    // serve on; its sessions are served by the new process as soon as its part is in.
    let (tx, rx) = crossbeam_channel::unbounded::<ShardExport>();
    let (mut sessions, mut conns, mut links, mut kept) = (0u32, 0u32, 0u32, 0usize);
    // The longest a shard took to export, and to have its part sent.
    let mut exported_at: Option<Duration> = None;
    let mut shard_sent = Duration::ZERO;
    // What was sent stays open here until the new process serves: closing ten thousand
    // descriptors is work the hand-over need not wait for.
    let mut sent = Vec::with_capacity(src.shards);
    for i in 0..src.shards {
        let shard_at = Instant::now();
        src.remote.send(i, ShardMsg::Export(tx.clone()));
        let x = rx.recv_timeout(Duration::from_secs(10)).map_err(|_| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                "a shard did not hand over within 10 s; its sessions are in the state dir",
            )
        })?;
        exported_at = Some(exported_at.unwrap_or_default().max(shard_at.elapsed()));
        let shard = x.shard as u16;
        kept += x.kept;
        let before = (sessions, conns, links);
        for record in &x.sessions {
            ch.queue(&Msg::Session { shard, record })?;
            sessions += 1;
        }
        for c in &x.conns {
            ch.queue_with_fds(
                &Msg::Conn {
                    shard,
                    sid: c.sid,
                    peer: &c.peer,
                    unread: &c.unread,
                    unsent: &c.unsent,
                },
                &[c.fd.as_fd()],
            )?;
            conns += 1;
        }
        for (key, bytes) in &x.held {
            ch.queue(&Msg::Held {
                shard,
                tenant: key.0,
                agent: key.1,
                bytes,
            })?;
        }
        for l in &x.links {
            ch.queue_with_fds(
                &Msg::Link {
                    shard,
                    tenant: l.key.0,
                    agent: l.key.1,
                    hello_seen: l.hello_seen,
                    unread: &l.unread,
                    unsent: &l.unsent,
                },
                &[l.fd.as_fd()],
            )?;
            links += 1;
        }
        ch.send(&Msg::ShardEnd {
            shard,
            sessions: sessions - before.0,
            conns: conns - before.1,
            links: links - before.2,
        })?;
        sent.push(x);
        // The next shard freezes once this one serves in the new process: a shard's pause is
        // its own hand-over, not shared with the next one's on the same cores.
        expect(
            &mut ch,
            pid,
            &Msg::ShardIn { shard },
            &format!("failed taking shard {shard} in"),
        )?;
        shard_sent = shard_sent.max(shard_at.elapsed());
    }
    ch.send(&Msg::Done {
        sessions,
        conns,
        links,
    })?;
    let handed = frozen_at.elapsed();
    expect(&mut ch, pid, &Msg::Ready, "failed after the hand-over").map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("{e}; the sessions are in the state dir: start clawtermd on it again"),
        )
    })?;
    for i in 0..src.shards {
        src.remote.send(i, ShardMsg::Release);
    }
    drop(sent);
    let m = &src.metrics;
    m.upgrades_completed.fetch_add(1, Ordering::Relaxed);
    m.note_upgrade(
        sessions as u64,
        conns as u64,
        links as u64,
        ch.sent,
        started.elapsed(),
    );
    info!(
        new_pid = pid,
        sessions,
        connections = conns,
        links,
        reconnecting = kept,
        bytes = ch.sent,
        frozen_ms = handed.as_millis() as u64,
        exported_ms = exported_at.unwrap_or_default().as_millis() as u64,
        shard_sent_ms = shard_sent.as_millis() as u64,
        took_ms = started.elapsed().as_millis() as u64,
        "upgrade: handed over; exiting"
    );
    Ok(true)
}

/// Waits for the new process's `want`. Its FAILED (saying what it `failed` doing, and why)
/// or any other message is an error.
fn expect(ch: &mut Channel, pid: u32, want: &Msg<'_>, failed: &str) -> io::Result<()> {
    let answer = ch.recv()?;
    match decode(&answer)? {
        m if &m == want => Ok(()),
        Msg::Failed(why) => Err(io::Error::other(format!(
            "the new clawtermd (pid {pid}) {failed}: {why}"
        ))),
        other => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("expected {want:?}, got {other:?}"),
        )),
    }
}
