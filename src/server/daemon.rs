//! Running a started [`Server`] as the daemon: signals received synchronously, the tokens file
//! and TLS certificate reloaded when they change, and the shards' health watched until a signal
//! (or a shard's failure) stops it. Every reload goes through [`Shared::reload`].
//!
//! [`Shared::reload`]: super::Shared::reload

use super::{watch, Auth, Server};
use std::path::PathBuf;
use std::time::Duration;

/// SIGINT, SIGTERM and SIGHUP, blocked so that they are only received through
/// [`Signals::wait`]; and SIGUSR2, the daemon's own wake-up ([`wake`]).
pub struct Signals(libc::sigset_t);

impl Signals {
    /// Blocks the signals in this thread and the threads it starts afterwards: call it before
    /// starting any.
    pub fn block() -> Signals {
        // SAFETY: sigset_t is plain data; sigemptyset/sigaddset initialise it and
        // pthread_sigmask only reads it. None of these calls can fail with valid signal numbers.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGINT);
            libc::sigaddset(&mut set, libc::SIGTERM);
            libc::sigaddset(&mut set, libc::SIGHUP);
            libc::sigaddset(&mut set, libc::SIGUSR2);
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            BLOCKED.store(true, std::sync::atomic::Ordering::SeqCst);
            Signals(set)
        }
    }

    /// Waits up to `timeout` for one of the signals; `None` when none came.
    pub fn wait(&self, timeout: Duration) -> Option<i32> {
        let ts = libc::timespec {
            tv_sec: timeout.as_secs() as libc::time_t,
            tv_nsec: timeout.subsec_nanos() as libc::c_long,
        };
        // SAFETY: `self.0` is an initialised sigset, `ts` a valid timespec, and a null siginfo
        // pointer is allowed.
        let sig = unsafe { libc::sigtimedwait(&self.0, std::ptr::null_mut(), &ts) };
        (sig > 0).then_some(sig)
    }
}

/// Wakes [`Server::run_until_signal`] at once (SIGUSR2 to this process, received only there):
/// a live upgrade that handed everything over does not wait for the next health check to end
/// this process.
pub fn wake() {
    // Only where the signal is blocked and waited for: elsewhere (a server embedded without
    // `Signals`) its default action would end the process.
    if !BLOCKED.load(std::sync::atomic::Ordering::SeqCst) {
        return;
    }
    let _ = rustix::process::kill_process(rustix::process::getpid(), rustix::process::Signal::USR2);
}

/// Set once [`Signals::block`] ran.
static BLOCKED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// How [`Server::run_until_signal`] ended.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Stop {
    /// SIGINT or SIGTERM (the number).
    Signal(i32),
    /// A shard ended on its own: the node cannot serve every session any more.
    ShardFailed,
    /// A live upgrade handed everything to a new clawtermd.
    Upgraded,
}

impl Server {
    /// Reloads the tokens file and the TLS certificate when they change on disk, as SIGHUP
    /// does (a warning in the log when they cannot be watched).
    pub fn watch_files(&self) {
        let cfg = &self.shared.cfg;
        let mut watched: Vec<PathBuf> = Vec::new();
        if let Auth::Tokens(p) = &cfg.auth {
            watched.push(p.clone());
        }
        if let Some((c, k)) = &cfg.tls {
            watched.push(c.clone());
            watched.push(k.clone());
        }
        if watched.is_empty() {
            return;
        }
        let shared = self.shared.clone();
        if let Err(e) = watch::watch(watched, move |path| {
            shared.reload(Some(path));
        }) {
            tracing::warn!(
                "cannot watch the tokens/TLS files for changes (SIGHUP still reloads): {e}"
            );
        }
    }

    /// Serves until SIGINT or SIGTERM, reloading on SIGHUP. Between signals, checks that every
    /// shard is still running: a shard that ended on its own (a panic, a fatal I/O error) takes
    /// its sessions with it, and only a restart brings the node back to full service.
    pub fn run_until_signal(&self, signals: &Signals) -> Stop {
        loop {
            match signals.wait(Duration::from_millis(250)) {
                None | Some(libc::SIGUSR2) => {
                    if self
                        .shared
                        .upgraded
                        .load(std::sync::atomic::Ordering::SeqCst)
                    {
                        return Stop::Upgraded;
                    }
                    if let Err(why) = self.shared.metrics.health() {
                        tracing::error!(
                            "{why}: the node cannot serve every session any more; stopping the \
                             others and exiting with an error so that the supervisor restarts \
                             clawtermd"
                        );
                        return Stop::ShardFailed;
                    }
                }
                Some(libc::SIGHUP) => {
                    self.shared.reload(None);
                }
                Some(s) => {
                    tracing::info!(signal = s, "shutting down");
                    return Stop::Signal(s);
                }
            }
        }
    }
}
