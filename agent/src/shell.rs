//! `claw-agent shell`: a login shell in a PTY per session (80x24 until the client says
//! otherwise). RESIZE sets the window size; PAUSE stops reading the terminal (the program
//! waits, nothing is lost); the shell keeps running while the client is away. The shell's exit
//! closes the session; closing the session hangs up its terminal (SIGHUP to every process of
//! the terminal's session, then SIGKILL after 2 s).
//!
//! No thread per session: the sessions of a link share one event loop thread ([`ptyloop`]),
//! which waits (epoll) on every session's PTY master and on a pidfd per shell, so a session
//! costs two descriptors in the agent and no thread. Shells are started with `posix_spawn`
//! ([`PtyCommand`]), not `fork()`, so starting one doesn't copy the agent's page tables.
//!
//! [`ptyloop`]: super::ptyloop

use super::ptyloop::{Key, LoopHandle, NewSession};
use super::pty::PtyCommand;
use super::{input_queue, Agent, CloseReason, InputSender, OpenInfo, Outbox, SessionId};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

/// Initial window size of a session's terminal (until the first RESIZE).
const SHELL_COLS: u16 = 80;
const SHELL_ROWS: u16 = 24;

/// The shell to run: `--shell`, else $SHELL, else /bin/sh.
pub fn shell_path(arg: Option<PathBuf>) -> PathBuf {
    arg.or_else(|| {
        std::env::var_os("SHELL")
            .filter(|s| !s.is_empty())
            .map(PathBuf::from)
    })
    .unwrap_or_else(|| PathBuf::from("/bin/sh"))
}

/// `shell`: a login shell in a PTY per session.
pub struct ShellAgent {
    shell: Arc<PathBuf>,
    /// The link's event loop, started with its first session.
    lp: Option<LoopHandle>,
    /// The link thread's side of each session: its key in the loop and its input queue.
    sessions: HashMap<SessionId, (Key, InputSender)>,
}

impl ShellAgent {
    /// An agent that starts `shell` as a login shell in a PTY for each session.
    pub fn new(shell: Arc<PathBuf>) -> ShellAgent {
        ShellAgent {
            shell,
            lp: None,
            sessions: HashMap::new(),
        }
    }

    /// Forgets sessions whose shell has exited (their CLOSE has been sent).
    fn forget_finished(&mut self) {
        if let Some(lp) = &self.lp {
            for (s, key) in lp.take_finished() {
                if self.sessions.get(&s).is_some_and(|(k, _)| *k == key) {
                    self.sessions.remove(&s);
                }
            }
        }
    }

    fn spawn(&mut self, s: SessionId, info: &OpenInfo, out: &Outbox) -> std::io::Result<()> {
        if self.lp.is_none() {
            self.lp = Some(LoopHandle::start(out.clone())?);
        }
        let Some(lp) = &self.lp else {
            return Err(std::io::Error::other("no event loop"));
        };
        let shell = &*self.shell;
        let name = shell
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "sh".to_owned());
        let mut cmd = PtyCommand::new(shell);
        cmd.arg0(format!("-{name}")) // a login shell
            .env("CLAW_TENANT", info.tenant.to_string())
            .env("CLAW_AGENT", info.agent.to_string())
            .env("CLAW_SESSION", s.to_string())
            .env("CLAW_PEER", &info.peer);
        if std::env::var_os("TERM").is_none() {
            cmd.env("TERM", "xterm-256color");
        }
        let child = cmd.spawn(SHELL_COLS, SHELL_ROWS)?;
        let pid = child.pid;
        let (tx, rx) = input_queue(s, out);
        let key = lp.add(NewSession {
            s,
            master: child.master,
            pid,
            input: rx,
        })?;
        tracing::debug!(
            session = s,
            pid,
            reopen = info.reopen,
            "shell: started"
        );
        self.sessions.insert(s, (key, tx));
        Ok(())
    }

    fn key(&self, s: SessionId) -> Option<(Key, &LoopHandle)> {
        Some((self.sessions.get(&s)?.0, self.lp.as_ref()?))
    }
}

impl Agent for ShellAgent {
    fn open(&mut self, s: SessionId, info: &OpenInfo, out: &Outbox) {
        self.forget_finished();
        if let Some((key, _)) = self.sessions.remove(&s) {
            if let Some(lp) = &self.lp {
                lp.kill(key);
            }
        }
        if let Err(e) = self.spawn(s, info, out) {
            tracing::warn!(session = s, error = %e, "shell: cannot start the shell");
            let msg = format!("claw-agent: cannot run {}: {e}\r\n", self.shell.display());
            let _ = out.data(s, msg.as_bytes());
            let _ = out.close(s, CloseReason::Error);
        }
    }

    fn data(&mut self, s: SessionId, bytes: &[u8], _out: &Outbox) {
        if let Some((key, tx)) = self.sessions.get_mut(&s) {
            tx.push(bytes);
            let key = *key;
            if let Some(lp) = &self.lp {
                lp.input(key);
            }
        }
    }

    fn resize(&mut self, s: SessionId, cols: u16, rows: u16, _out: &Outbox) {
        if let Some((key, lp)) = self.key(s) {
            lp.resize(key, cols, rows);
        }
    }

    fn pause(&mut self, s: SessionId, _out: &Outbox) {
        if let Some((key, lp)) = self.key(s) {
            lp.pause(key, true);
        }
    }

    fn resume_output(&mut self, s: SessionId, _out: &Outbox) {
        if let Some((key, lp)) = self.key(s) {
            lp.pause(key, false);
        }
    }

    fn close(&mut self, s: SessionId, _reason: CloseReason, _out: &Outbox) {
        if let Some((key, _)) = self.sessions.remove(&s) {
            if let Some(lp) = &self.lp {
                lp.kill(key);
            }
        }
        self.forget_finished();
    }

    fn link_closed(&mut self, _out: &Outbox) {
        self.sessions.clear();
        if let Some(lp) = self.lp.take() {
            lp.shutdown();
        }
    }
}

impl Drop for ShellAgent {
    fn drop(&mut self) {
        if let Some(lp) = self.lp.take() {
            lp.shutdown();
        }
    }
}
