//! The pod's listening socket and its accept loop.

use std::io;
use std::net::Shutdown;
use std::os::fd::AsFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use super::link::serve_link_with;
use super::orphans::{Orphans, DEFAULT_DAEMON_GRACE};
use super::Agent;

/// How often [`AgentListener::serve`] looks at its stop flag.
const STOP_POLL_MS: i32 = 50;

/// A pod's listening socket at `{dir}/{tenant}_{agent}`. The socket file is removed when the
/// listener is dropped (if it is still ours).
///
/// Sessions outlive the daemon for a grace period ([`AgentListener::daemon_grace`], default
/// [`DEFAULT_DAEMON_GRACE`]): see [`Agent`]'s "Daemon restarts".
pub struct AgentListener {
    listener: UnixListener,
    path: PathBuf,
    /// (device, inode) of the socket file we bound, so that drop removes only our own.
    id: (u64, u64),
    /// Sessions whose link ended without a CLOSE, kept for a REOPEN on any link.
    orphans: Arc<Orphans>,
}

impl std::fmt::Debug for AgentListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentListener")
            .field("path", &self.path)
            .field("daemon_grace", &self.orphans.grace())
            .finish_non_exhaustive()
    }
}

impl AgentListener {
    /// The socket path for (tenant, agent) in `dir`: `{dir}/{tenant}_{agent}`.
    pub fn socket_path(dir: &Path, tenant: u32, agent: u32) -> PathBuf {
        dir.join(format!("{tenant}_{agent}"))
    }

    /// Binds `{dir}/{tenant}_{agent}`, creating `dir` if missing.
    ///
    /// A stale socket file there (nobody listening: connecting is refused) is replaced. If
    /// another agent is listening there, fails with `AddrInUse` and a message saying so; if
    /// something other than a socket is there, fails with `AlreadyExists`.
    pub fn bind(dir: &Path, tenant: u32, agent: u32) -> io::Result<AgentListener> {
        std::fs::create_dir_all(dir).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot create socket directory {}: {e}", dir.display()),
            )
        })?;
        let path = Self::socket_path(dir, tenant, agent);
        // Refuse if a live agent is there; remove a stale socket file.
        Self::clear_stale(&path)?;
        // Publish the socket atomically: bind (which also listens) under a temporary name the
        // daemon ignores, then rename it into place, so the daemon never sees a socket file
        // that refuses connections.
        let tmp = dir.join(format!(".{tenant}_{agent}.{}.tmp", std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        let listener = UnixListener::bind(&tmp)
            .map_err(|e| io::Error::new(e.kind(), format!("cannot bind {}: {e}", tmp.display())))?;
        if let Err(e) = std::fs::rename(&tmp, &path) {
            let _ = std::fs::remove_file(&tmp);
            return Err(io::Error::new(
                e.kind(),
                format!(
                    "cannot move the socket into place at {}: {e}",
                    path.display()
                ),
            ));
        }
        listener.set_nonblocking(true)?;
        let md = std::fs::symlink_metadata(&path)?;
        Ok(AgentListener {
            listener,
            path,
            id: (md.dev(), md.ino()),
            orphans: Arc::new(Orphans::new(DEFAULT_DAEMON_GRACE)),
        })
    }

    /// How long a session outlives its link when the link ends without a CLOSE for it (the
    /// daemon exited or crashed): within it, a REOPEN of its SESSION_ID on any link of this
    /// listener continues it ([`Agent::orphan`], [`Agent::rebind`]); after it, the session
    /// ends. `Duration::ZERO`: sessions end with their link. Default [`DEFAULT_DAEMON_GRACE`].
    /// Set it before [`AgentListener::serve`].
    pub fn daemon_grace(mut self, grace: Duration) -> AgentListener {
        self.orphans = Arc::new(Orphans::new(grace));
        self
    }

    /// Sessions kept now for a REOPEN (their link ended without a CLOSE, the grace is not over).
    pub fn orphaned_sessions(&self) -> usize {
        self.orphans.len()
    }

    /// Something is at `path`: remove it if it is a socket nobody listens on.
    fn clear_stale(path: &Path) -> io::Result<()> {
        let md = match std::fs::symlink_metadata(path) {
            Ok(md) => md,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        if !md.file_type().is_socket() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!(
                    "{} exists and is not a socket; not replacing it",
                    path.display()
                ),
            ));
        }
        match UnixStream::connect(path) {
            Ok(_) => Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!(
                    "another agent is already listening on {}; refusing to start",
                    path.display()
                ),
            )),
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                tracing::info!(path = %path.display(), "replacing stale socket file");
                match std::fs::remove_file(path) {
                    Ok(()) => Ok(()),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                    Err(e) => Err(e),
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io::Error::new(
                e.kind(),
                format!("cannot check existing socket {}: {e}", path.display()),
            )),
        }
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Serves links until `stop` is set, each link on its own thread with a fresh handler from
    /// `factory`; the SDK does the HELLO exchange (announcing itself as `claw-agent`).
    ///
    /// `stop` is checked at least every 100 ms. When it is set, accepting stops, the sessions
    /// kept for a REOPEN are ended, every link is shut down (each handler gets
    /// [`Agent::link_closed`], its sessions end) and this returns once all link threads have
    /// ended. Errors from `accept` that concern one connection are logged and skipped; only an
    /// unusable listener is returned as an error.
    pub fn serve<F, A>(&self, factory: F, stop: Arc<AtomicBool>) -> io::Result<()>
    where
        F: Fn() -> A + Send + Sync + 'static,
        A: Agent + Send + 'static,
    {
        let mut links: Vec<(UnixStream, JoinHandle<()>)> = Vec::new();
        let factory = Arc::new(factory);
        let mut next_link = 0u64;
        let mut timer = None;
        if !self.orphans.grace().is_zero() {
            self.orphans.open();
            let orphans = Arc::clone(&self.orphans);
            match std::thread::Builder::new()
                .name("claw-agent-grace".into())
                .spawn(move || orphans.run_timer())
            {
                Ok(h) => timer = Some(h),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot start the daemon grace's timer; sessions end with their link");
                    self.orphans.close();
                }
            }
        }
        let result = loop {
            if stop.load(Ordering::SeqCst) {
                break Ok(());
            }
            // Forget links that have ended.
            links.retain(|(_, h)| !h.is_finished());
            match clawterm_poll::readable(self.listener.as_fd(), STOP_POLL_MS) {
                Ok(false) => continue,
                Ok(true) => {}
                Err(e) => break Err(e),
            }
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if let Err(e) = stream.set_nonblocking(false) {
                        tracing::warn!(error = %e, "cannot set up accepted link; dropped");
                        continue;
                    }
                    let ctl = match stream.try_clone() {
                        Ok(c) => c,
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot set up accepted link; dropped");
                            continue;
                        }
                    };
                    next_link += 1;
                    let link = next_link;
                    let factory = Arc::clone(&factory);
                    let orphans = Arc::clone(&self.orphans);
                    let spawned = std::thread::Builder::new()
                        .name(format!("claw-agent-link-{link}"))
                        .spawn(move || {
                            tracing::debug!(link, "pod link accepted");
                            let _ = serve_link_with(stream, || factory(), Some(&orphans));
                            tracing::debug!(link, "pod link ended");
                        });
                    match spawned {
                        Ok(h) => links.push((ctl, h)),
                        Err(e) => tracing::warn!(error = %e, "cannot start a link thread"),
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock
                            | io::ErrorKind::Interrupted
                            | io::ErrorKind::ConnectionAborted
                    ) => {}
                Err(e) => {
                    // EMFILE and the like: log, back off a little, keep serving.
                    tracing::warn!(error = %e, "accept failed");
                    std::thread::sleep(std::time::Duration::from_millis(STOP_POLL_MS as u64));
                }
            }
        };
        // Stopping: the links' sessions end with them, and so do the kept ones.
        self.orphans.close();
        for (s, _) in &links {
            let _ = s.shutdown(Shutdown::Both);
        }
        for (_, h) in links {
            let _ = h.join();
        }
        if let Some(h) = timer {
            let _ = h.join();
        }
        result
    }
}

impl Drop for AgentListener {
    fn drop(&mut self) {
        if let Ok(md) = std::fs::symlink_metadata(&self.path) {
            if (md.dev(), md.ino()) == self.id {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}
